# Cross-compiling for 64-bit ARM with Debian's cross compiler and arm64 packages (multiarch), the
# tests to run under qemu-user (the aarch64 preset; `make test-aarch64`, whose install step adds
# the arm64 architecture and `scripts/install-deps.sh aarch64`'s packages).
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
# Highway compiles NEON and the SVE targets (SVE, SVE2, SVE_256, SVE2_128); each test run checks
# every one the emulated CPU supports.
#
# The emulator: qemu's "max" CPU has NEON, SVE and SVE2. The dynamic loader is the cross
# toolchain's (/usr/aarch64-linux-gnu/lib, found through -L); its libc must be the one beside it,
# not the arm64 package's libc.so.6 of another Debian revision that qemu would otherwise find
# under /lib/aarch64-linux-gnu (the two disagree on the loader's private interface and the first
# thread a program starts hangs), hence LD_LIBRARY_PATH. The arm64 packages' other libraries
# (OpenBLAS, Highway, fmt, GoogleTest) are found in /lib/aarch64-linux-gnu.
set(QKV_AARCH64_QEMU qemu-aarch64 -L /usr/aarch64-linux-gnu -E
                     LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib)
set(CMAKE_CROSSCOMPILING_EMULATOR ${QKV_AARCH64_QEMU} -cpu max)
