# Cross-compiling for 64-bit ARM with Debian's cross compiler and arm64 packages (multiarch), the
# tests to run under qemu-user (the aarch64 preset). Needs `dpkg --add-architecture arm64` and
# g++-aarch64-linux-gnu qemu-user libhwy-dev:arm64 libopenblas-dev:arm64 libfmt-dev:arm64
# libgtest-dev:arm64 libgmock-dev:arm64. Not yet in CI: the library and tests build, but the test
# binary does not yet get past its start under qemu (issue 16).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
# Libraries and CMake packages from the arm64 packages, programs from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu /usr/lib/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
set(ENV{PKG_CONFIG_LIBDIR} /usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig)
# NEON only: the kernels' register tiles are arrays of vectors, which SVE's sizeless vector types
# cannot form (HWY_SVE, HWY_SVE2, HWY_SVE_256, HWY_SVE2_128 are bits 24 to 27).
set(CMAKE_CXX_FLAGS_INIT "-DHWY_DISABLED_TARGETS=0x0F000000")
# qemu's "max" CPU runs every target compiled in.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;/usr/aarch64-linux-gnu;-cpu;max)
