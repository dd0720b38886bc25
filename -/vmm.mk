# vmm.mk: build rules for vmm guests (part of the guest SDK; `vmm guest-sdk` prints where it is).
#
# In your Makefile:
#     VMM_SDK := $(shell vmm guest-sdk --path)
#     include $(VMM_SDK)/vmm.mk
#     all: myguest.elf myguest.bin
#
# Rules:  NAME.elf from NAME.c (linked with crt0.S at CPL3; define int vmm_main(unsigned vcpu))
#         NAME.elf from NAME.S (assembly; .include "vmm.inc", entry _start in .text.entry)
#         NAME.bin from NAME.elf (a flat binary for `vmm run`, loaded at 1 MiB), NAME.sym (symbols)
# Both link at 1 MiB with guest.ld. Override VMM_CFLAGS for optimisation or target flags; vector
# code belongs in functions with __attribute__((target("avx2"))) etc., called only when CPUID
# says the vCPU has the feature.

# the including Makefile's first target stays its default goal
_vmm_goal := $(.DEFAULT_GOAL)
VMM_SDK ?= $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
VMM_CC ?= gcc
VMM_AS ?= as
VMM_LD ?= ld
VMM_OBJCOPY ?= objcopy
VMM_NM ?= nm
VMM_CFLAGS ?= -O2 -Wall
# freestanding, static, no PIE, nothing that needs a C library or an OS (stack protector, unwind
# tables, CET notes), small code model at 1 MiB
VMM_CFLAGS_REQUIRED := -ffreestanding -nostdlib -static -fno-pie -no-pie -fno-pic -m64 \
	-mcmodel=small -fno-stack-protector -fno-asynchronous-unwind-tables -fcf-protection=none \
	-I$(VMM_SDK)
comma := ,
VMM_LDFLAGS := -Wl,-T,$(VMM_SDK)/guest.ld -Wl,--build-id=none -Wl,-z,noexecstack \
	$(if $(shell $(VMM_LD) --help 2>/dev/null | grep -e --no-warn-rwx-segments),-Wl$(comma)--no-warn-rwx-segments)

%.o: %.S $(VMM_SDK)/vmm.inc
	$(VMM_AS) --64 -I $(VMM_SDK) -I . -o $@ $<

vmm-crt0.o: $(VMM_SDK)/crt0.S $(VMM_SDK)/vmm.inc
	$(VMM_AS) --64 -I $(VMM_SDK) -o $@ $<

%.elf: %.c vmm-crt0.o $(VMM_SDK)/vmm.h $(VMM_SDK)/guest.ld
	$(VMM_CC) $(VMM_CFLAGS_REQUIRED) $(VMM_CFLAGS) $(VMM_LDFLAGS) -o $@ vmm-crt0.o $<

%.elf: %.o $(VMM_SDK)/guest.ld
	$(VMM_LD) -static -nostdlib --build-id=none -T $(VMM_SDK)/guest.ld -o $@ $<

%.bin: %.elf
	$(VMM_OBJCOPY) -O binary $< $@
	$(VMM_NM) $< > $*.sym

.PRECIOUS: %.elf %.o vmm-crt0.o

.DEFAULT_GOAL := $(_vmm_goal)
