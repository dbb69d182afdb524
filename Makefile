# ublk-qcow2 build.
#   make            optimised binary: build/ublk-qcow2
#   make check      sanitized (ASan/UBSan) build in build/debug, then every test
#   make bench      optimised build, then the benchmark suite
#   make soak       long crash/fuzz/soak runs
#   make fuzz       libFuzzer targets (clang, ASan/UBSan) in build/fuzz (tests/fuzz/t_fuzz.sh runs them)
CC      ?= cc
PKGS    := liburing zlib libzstd libdeflate libsystemd libcrypto gnutls
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -luring -lz -lzstd -ldeflate -lsystemd -lcrypto -lgnutls)

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

LIB_SRCS := $(wildcard src/img/*.c src/qcow2/*.c src/tools/*.c src/util/*.c src/io/*.c src/nbd/*.c src/ublk/*.c)
CLI_SRCS := $(wildcard src/cli/*.c)
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
CLI_OBJS := $(CLI_SRCS:%.c=$(BUILD)/obj/%.o)
UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)
# Programs the shell suites drive (tests/crash, tests/vm).  Not named test_*:
# tests/run.sh runs every $(BUILD)/tests/test_* as a unit test.
HELPER_BINS := $(BUILD)/tests/crashsim $(BUILD)/tests/ublk_ctrl_test

.PHONY: all check bench soak clean unit debug deps demo fuzz install uninstall
all: $(BUILD)/ublk-qcow2

$(BUILD)/ublk-qcow2: $(CLI_OBJS) $(BUILD)/libublkqcow2.a
	$(CC) $(LDFLAGS_ALL) -o $@ $(CLI_OBJS) $(BUILD)/libublkqcow2.a $(PKG_LIBS) -lpthread

$(BUILD)/libublkqcow2.a: $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -MMD -MP -c -o $@ $<

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libublkqcow2.a $(wildcard tests/unit/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -Itests/unit -o $@ $< $(BUILD)/libublkqcow2.a $(PKG_LIBS) -lpthread

$(BUILD)/tests/crashsim: tests/crash/crashsim.c $(BUILD)/libublkqcow2.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -MMD -MP -o $@ $< $(BUILD)/libublkqcow2.a $(PKG_LIBS) -lpthread

$(BUILD)/tests/ublk_ctrl_test: tests/vm/ublk_ctrl_test.c $(BUILD)/libublkqcow2.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -MMD -MP -o $@ $< $(BUILD)/libublkqcow2.a $(PKG_LIBS) -lpthread

unit: $(BUILD)/ublk-qcow2 $(UNIT_BINS) $(HELPER_BINS)

# libFuzzer targets: tests/fuzz/fuzz_*.c, each linked with the library built by
# clang with the fuzzer's coverage instrumentation and ASan/UBSan.
FUZZ_CC     ?= clang
FUZZ_DIR    := build/fuzz
FUZZ_CFLAGS := $(filter-out -Wno-format-truncation,$(WARN)) -g -O1 -fno-omit-frame-pointer \
               -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined \
               -Isrc $(PKG_CFLAGS)
FUZZ_OBJS   := $(LIB_SRCS:%.c=$(FUZZ_DIR)/obj/%.o)
FUZZ_BINS   := $(patsubst tests/fuzz/%.c,$(FUZZ_DIR)/%,$(wildcard tests/fuzz/fuzz_*.c))

fuzz: $(FUZZ_BINS)

$(FUZZ_DIR)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -MMD -MP -c -o $@ $<

$(FUZZ_DIR)/libublkqcow2.a: $(FUZZ_OBJS)
	rm -f $@ && ar rcs $@ $^

$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_DIR)/libublkqcow2.a
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -MMD -MP -o $@ $< $(FUZZ_DIR)/libublkqcow2.a $(PKG_LIBS) -lpthread

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

# make install [PREFIX=/usr/local] [DESTDIR=...]: the command, its man page,
# the systemd unit template and the udev rule (udev reads /usr/lib and /etc
# only, so with a PREFIX other than /usr the rule goes to /etc).
PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
MANDIR  ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
UDEVRULESDIR ?= $(if $(filter /usr,$(PREFIX)),/usr/lib/udev/rules.d,/etc/udev/rules.d)
INSTALLED := $(BINDIR)/ublk-qcow2 $(MANDIR)/man8/ublk-qcow2.8 $(UNITDIR)/ublk-qcow2@.service \
             $(UDEVRULESDIR)/99-ublk-qcow2.rules

install: $(BUILD)/ublk-qcow2
	install -D -m 755 $(BUILD)/ublk-qcow2 $(DESTDIR)$(BINDIR)/ublk-qcow2
	install -D -m 644 docs/ublk-qcow2.8 $(DESTDIR)$(MANDIR)/man8/ublk-qcow2.8
	mkdir -p $(DESTDIR)$(UNITDIR) $(DESTDIR)$(UDEVRULESDIR)
	sed 's|@BINDIR@|$(BINDIR)|g' dist/ublk-qcow2@.service.in > $(DESTDIR)$(UNITDIR)/ublk-qcow2@.service
	sed 's|@BINDIR@|$(BINDIR)|g' dist/99-ublk-qcow2.rules.in > $(DESTDIR)$(UDEVRULESDIR)/99-ublk-qcow2.rules
	chmod 644 $(DESTDIR)$(UNITDIR)/ublk-qcow2@.service $(DESTDIR)$(UDEVRULESDIR)/99-ublk-qcow2.rules

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))

clean:
	rm -rf build

-include $(LIB_OBJS:.o=.d) $(CLI_OBJS:.o=.d) $(FUZZ_OBJS:.o=.d) $(FUZZ_BINS:=.d) $(HELPER_BINS:=.d)
