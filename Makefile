# The two commands of the README: `make demo` and `make test`. Each installs what is missing,
# builds, then runs. Everything else is CMake (presets in CMakePresets.json).
JOBS ?= $(shell nproc)

.PHONY: demo test test-sanitize test-aarch64 build build-sanitize deps format clean

demo: build
	./build/release/tools/qkv demo

test: build
	ctest --preset release -j $(JOBS)

# The same tests built with AddressSanitizer and UndefinedBehaviorSanitizer (.ci/run runs both).
test-sanitize: build-sanitize
	ctest --preset sanitize -j $(JOBS)

# The library and unit tests cross-built for 64-bit ARM and run under qemu-user: NEON, SVE and SVE2
# (tests/CMakeLists.txt says which tests run at which vector length). Installs the cross compiler,
# qemu-user and the arm64 libraries first.
test-aarch64:
	@./scripts/install-deps.sh aarch64
	cmake --preset aarch64 >/dev/null
	cmake --build --preset aarch64 -j $(JOBS)
	ctest --preset aarch64 -j $(JOBS)

build: deps
	cmake --preset release >/dev/null
	cmake --build --preset release -j $(JOBS)

build-sanitize: deps
	cmake --preset sanitize >/dev/null
	cmake --build --preset sanitize -j $(JOBS)

deps:
	@./scripts/install-deps.sh

format:
	clang-format -i $$(git ls-files '*.cpp' '*.hpp')

clean:
	rm -rf build
