# ublk-qcow2 build.
#   make            optimised binary: build/ublk-qcow2
#   make check      sanitized (ASan/UBSan) build in build/debug, then every test
#   make bench      optimised build, then the benchmark suite
#   make soak       long crash/fuzz/soak runs
CC      ?= cc
PKGS    := liburing zlib libzstd
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -luring -lz -lzstd)

WARN    := -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Wno-format-truncation -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64
CFLAGS_release := -O2 -g
CFLAGS_debug   := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

MODE    ?= release
ifeq ($(MODE),debug)
BUILD   ?= build/debug
else
BUILD   ?= build
endif
CFLAGS_ALL := $(WARN) $(CFLAGS_$(MODE)) -Isrc $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDFLAGS_ALL := $(CFLAGS_$(MODE)) $(LDFLAGS)

LIB_SRCS := $(wildcard src/qcow2/*.c src/io/*.c src/nbd/*.c src/ublk/*.c)
CLI_SRCS := $(wildcard src/cli/*.c)
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
CLI_OBJS := $(CLI_SRCS:%.c=$(BUILD)/obj/%.o)
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)

.PHONY: all check bench soak clean unit debug deps demo
all: $(BUILD)/ublk-qcow2

$(BUILD)/ublk-qcow2: $(CLI_OBJS) $(BUILD)/libublkqcow2.a
	$(CC) $(LDFLAGS_ALL) -o $@ $(CLI_OBJS) $(BUILD)/libublkqcow2.a $(PKG_LIBS) -lpthread

$(BUILD)/libublkqcow2.a: $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -MMD -MP -c -o $@ $<

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libublkqcow2.a tests/unit/unit.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -Itests/unit -o $@ $< $(BUILD)/libublkqcow2.a $(PKG_LIBS) -lpthread

unit: $(BUILD)/ublk-qcow2 $(UNIT_BINS)

# Tests always run against the sanitized build.
debug:
	$(MAKE) MODE=debug unit

# Installs missing Debian packages first (needs root, as on CI).
deps:
	tests/deps.sh

check: deps
	$(MAKE) debug
	tests/run.sh build/debug

bench: deps
	$(MAKE) all
	bench/bench.py build/ublk-qcow2

soak: deps
	$(MAKE) debug
	SOAK=1 tests/run.sh build/debug

# The main job: a demo image as a ublk block device with ext4 on it (in a VM
# if this kernel has no ublk), then over NBD; qemu-img judges each image.
demo: deps
	$(MAKE) all
	scripts/demo.sh

clean:
	rm -rf build

-include $(LIB_OBJS:.o=.d) $(CLI_OBJS:.o=.d)
