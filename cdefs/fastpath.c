/*
 * The C fast path of vCPU state save/restore (vmm/fastpath.py is its Python side).
 *
 * One call saves or restores one vCPU's state into/from preallocated buffers: the state of
 * vmm.state.VcpuState minus its per-vCPU constants (guest CPUID, TSC frequency), which the Python
 * side sets once per vCPU, never per restore. It needs fewer ioctls than one per piece of state
 * because KVM_CAP_SYNC_REGS lets KVM_RUN carry regs, sregs and vCPU events in kvm_run:
 *
 *   save:    the KVM_RUN with immediate_exit that completes pending port I/O (vmm.state.save_state
 *            issues it too) runs with kvm_valid_regs set, so KVM stores regs/sregs/events into
 *            kvm_run on its way out; then KVM_GET_MSRS, GET_MP_STATE, GET_XSAVE2, GET_XCRS,
 *            GET_DEBUGREGS, GET_LAPIC. 7 vCPU ioctls instead of 10.
 *   restore: KVM_SET_LAPIC, SET_MSRS (TSC deadline last), SET_XCRS, SET_XSAVE, SET_MP_STATE,
 *            SET_DEBUGREGS; regs/sregs/events go into kvm_run with kvm_dirty_regs set and KVM loads
 *            them at the next KVM_RUN (regs, then sregs, then events). 6 vCPU ioctls instead of 9.
 *
 * Deferred pieces take effect only at the next KVM_RUN: a KVM_GET_REGS before it still returns the
 * old registers, and a KVM_SET_REGS/SREGS/VCPU_EVENTS before it is overwritten by it.
 *
 * Deferring moves sregs and events after the LAPIC, MSRs, XCRS and XSAVE, against state.py's
 * documented order. That is safe only when nothing set earlier depends on them, so a piece is
 * deferred only when all of these hold, and is otherwise set by ioctl in its documented place:
 *   - the state is trusted on this vCPU (st->trusted): it was saved from it or KVM has already
 *     accepted it there through ioctls, so KVM's checks at the next KVM_RUN cannot fail. The first
 *     restore of any other state sets everything by ioctl, in the documented order;
 *   - mp_state is RUNNABLE or HALTED: KVM_RUN from other states returns before loading sync regs,
 *     and KVM_SET_MP_STATE(INIT/SIPI_RECEIVED) is checked against the SMM state the events set;
 *   - sregs only: the APIC base stays the one the vCPU has (kvm_run->apic_base, which KVM writes
 *     on every return from KVM_RUN), so KVM_SET_LAPIC reads the registers in the right APIC mode;
 *     and CR8 agrees with the LAPIC TPR (KVM_SET_SREGS writes TPR = CR8 << 4).
 * The APIC base check trusts kvm_run->apic_base: code that changes the APIC base through
 * KVM_SET_SREGS or KVM_SET_MSRS must let a KVM_RUN happen before the next fast restore.
 *
 * KVM_CAP_XSAVE2 is asked on the VM fd before every XSAVE transfer (as KVM's selftests do): KVM
 * copies that many bytes, which grows after an arch_prctl guest-permission request, and a buffer
 * of the old size would overflow. A restore asks first, before it sets any piece.
 */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define VMM_FP_SYNC_ALL (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS)

/* flags of vmm_fp_vcpu */
#define VMM_FP_HAS_LAPIC 1	/* the VM has an in-kernel irqchip */
#define VMM_FP_SYNC_REGS 2	/* KVM_CAP_SYNC_REGS covers regs, sregs and events */
#define VMM_FP_NO_DEFER 4	/* restore every piece by ioctl (for comparison and tests) */

/* the step that failed, in vmm_fp_vcpu.step */
#define VMM_FP_STEP_RUN 1
#define VMM_FP_STEP_XSAVE_SIZE 2
#define VMM_FP_STEP_REGS 3
#define VMM_FP_STEP_SREGS 4
#define VMM_FP_STEP_EVENTS 5
#define VMM_FP_STEP_MSRS 6
#define VMM_FP_STEP_MP_STATE 7
#define VMM_FP_STEP_XSAVE 8
#define VMM_FP_STEP_XCRS 9
#define VMM_FP_STEP_DEBUGREGS 10
#define VMM_FP_STEP_LAPIC 11

#define VMM_FP_APIC_TASKPRI 0x80

struct vmm_fp_vcpu {
	int fd;			/* the vCPU */
	int vm_fd;		/* its VM (KVM_CAP_XSAVE2) */
	struct kvm_run *run;	/* its mapped kvm_run */
	unsigned int flags;	/* VMM_FP_* */
	/* results of the last call */
	int step;		/* VMM_FP_STEP_* that failed, 0 if none */
	int done;		/* MSRs KVM got/set before it stopped; the XSAVE size KVM wants */
	int vcpu_ioctls;	/* vCPU ioctls issued (KVM_RUN included) */
	int vm_ioctls;		/* VM ioctls issued */
	unsigned int deferred;	/* KVM_SYNC_X86_* pieces left in kvm_run for the next KVM_RUN */
};

struct vmm_fp_state {
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_vcpu_events events;
	struct kvm_mp_state mp_state;
	struct kvm_xcrs xcrs;
	struct kvm_debugregs debugregs;
	struct kvm_lapic_state lapic;
	unsigned int has_lapic;		/* lapic holds state */
	unsigned int trusted;		/* see the top of this file */
	unsigned int xsave_size;	/* bytes at xsave */
	unsigned int pad;
	void *xsave;
	struct kvm_msrs *msrs;		/* nmsrs entries, indices set by the caller, TSC deadline last */
};

static long vmm_fp_ioctl(struct vmm_fp_vcpu *v, int step, unsigned long req, void *arg)
{
	long r = ioctl(v->fd, req, arg);
	v->vcpu_ioctls++;
	if (r < 0) {
		v->step = step;
		return -errno;
	}
	return r;
}

/* KVM_CAP_XSAVE2 now: 0 when it matches the buffer, -EMSGSIZE (size in v->done) when it does not */
static long vmm_fp_xsave_size(struct vmm_fp_vcpu *v, unsigned int have, unsigned long *get)
{
	long size = ioctl(v->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	v->vm_ioctls++;
	if (size < 0) {
		v->step = VMM_FP_STEP_XSAVE_SIZE;
		return -errno;
	}
	*get = size ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
	if (size < (long)sizeof(struct kvm_xsave))
		size = sizeof(struct kvm_xsave);
	if ((unsigned long)size != have) {
		v->step = VMM_FP_STEP_XSAVE_SIZE;
		v->done = (int)size;
		return -EMSGSIZE;
	}
	return 0;
}

static void vmm_fp_begin(struct vmm_fp_vcpu *v)
{
	v->step = 0;
	v->done = 0;
	v->vcpu_ioctls = 0;
	v->vm_ioctls = 0;
}

long vmm_fp_save(struct vmm_fp_vcpu *v, struct vmm_fp_state *st)
{
	struct kvm_run *run = v->run;
	int sync = (v->flags & VMM_FP_SYNC_REGS) != 0;
	__u64 valid = run->kvm_valid_regs;
	unsigned long get_xsave;
	long r;

	vmm_fp_begin(v);
	st->trusted = 0;
	/* 1. complete pending I/O; KVM also loads pending dirty sync regs first, stores them after */
	if (sync)
		run->kvm_valid_regs = valid | VMM_FP_SYNC_ALL;
	run->immediate_exit = 1;
	r = vmm_fp_ioctl(v, VMM_FP_STEP_RUN, KVM_RUN, NULL);
	run->immediate_exit = 0;
	run->kvm_valid_regs = valid;
	if (r == -EINTR) {
		run->exit_reason = KVM_EXIT_INTR;	/* as vmm.vcpu.Vcpu.run() records it */
		v->step = 0;
	} else if (r < 0) {
		return r;
	}
	if (sync) {
		memcpy(&st->regs, &run->s.regs.regs, sizeof(st->regs));
		memcpy(&st->sregs, &run->s.regs.sregs, sizeof(st->sregs));
		memcpy(&st->events, &run->s.regs.events, sizeof(st->events));
	}
	/* 2. what kvm_run does not carry, in vmm.state.save_state's order */
	st->msrs->pad = 0;
	r = vmm_fp_ioctl(v, VMM_FP_STEP_MSRS, KVM_GET_MSRS, st->msrs);
	if (r < 0)
		return r;
	if (r < (long)st->msrs->nmsrs) {
		v->step = VMM_FP_STEP_MSRS;
		v->done = (int)r;
		return -EINVAL;
	}
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_MP_STATE, KVM_GET_MP_STATE, &st->mp_state)) < 0)
		return r;
	if (!sync) {
		if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_REGS, KVM_GET_REGS, &st->regs)) < 0)
			return r;
		if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_SREGS, KVM_GET_SREGS, &st->sregs)) < 0)
			return r;
	}
	if ((r = vmm_fp_xsave_size(v, st->xsave_size, &get_xsave)) < 0)
		return r;
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_XSAVE, get_xsave, st->xsave)) < 0)
		return r;
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_XCRS, KVM_GET_XCRS, &st->xcrs)) < 0)
		return r;
	if (!sync && (r = vmm_fp_ioctl(v, VMM_FP_STEP_EVENTS, KVM_GET_VCPU_EVENTS, &st->events)) < 0)
		return r;
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_DEBUGREGS, KVM_GET_DEBUGREGS, &st->debugregs)) < 0)
		return r;
	st->has_lapic = (v->flags & VMM_FP_HAS_LAPIC) != 0;
	if (st->has_lapic && (r = vmm_fp_ioctl(v, VMM_FP_STEP_LAPIC, KVM_GET_LAPIC, &st->lapic)) < 0)
		return r;
	st->trusted = 1;
	return 0;
}

/* Which of regs/sregs/events may ride on kvm_run into the next KVM_RUN (top of this file). */
static unsigned int vmm_fp_deferrable(const struct vmm_fp_vcpu *v, const struct vmm_fp_state *st)
{
	unsigned int bits = VMM_FP_SYNC_ALL;
	__u32 tpr;

	if (!(v->flags & VMM_FP_SYNC_REGS) || (v->flags & VMM_FP_NO_DEFER) || !st->trusted)
		return 0;
	if (st->mp_state.mp_state != KVM_MP_STATE_RUNNABLE && st->mp_state.mp_state != KVM_MP_STATE_HALTED)
		return 0;
	if (st->sregs.apic_base != v->run->apic_base)
		bits &= ~KVM_SYNC_X86_SREGS;
	if (st->has_lapic) {
		memcpy(&tpr, st->lapic.regs + VMM_FP_APIC_TASKPRI, sizeof(tpr));
		if ((tpr & 0xff) != ((st->sregs.cr8 & 0xf) << 4))
			bits &= ~KVM_SYNC_X86_SREGS;
	}
	return bits;
}

long vmm_fp_restore(struct vmm_fp_vcpu *v, struct vmm_fp_state *st)
{
	struct kvm_run *run = v->run;
	unsigned int defer = vmm_fp_deferrable(v, st);
	unsigned long get_xsave;
	long r;

	vmm_fp_begin(v);
	v->deferred = 0;
	/* the XSAVE size first: a buffer KVM would now read past is refused before any piece is set */
	if ((r = vmm_fp_xsave_size(v, st->xsave_size, &get_xsave)) < 0)
		return r;
	/* pieces of an earlier restore that are still pending would overwrite this one */
	run->kvm_dirty_regs &= ~(__u64)VMM_FP_SYNC_ALL;

	if (!(defer & KVM_SYNC_X86_SREGS) &&
	    (r = vmm_fp_ioctl(v, VMM_FP_STEP_SREGS, KVM_SET_SREGS, &st->sregs)) < 0)
		return r;
	if (st->has_lapic && (r = vmm_fp_ioctl(v, VMM_FP_STEP_LAPIC, KVM_SET_LAPIC, &st->lapic)) < 0)
		return r;
	st->msrs->pad = 0;
	r = vmm_fp_ioctl(v, VMM_FP_STEP_MSRS, KVM_SET_MSRS, st->msrs);
	if (r < 0)
		return r;
	if (r < (long)st->msrs->nmsrs) {
		v->step = VMM_FP_STEP_MSRS;
		v->done = (int)r;
		return -EINVAL;
	}
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_XCRS, KVM_SET_XCRS, &st->xcrs)) < 0)
		return r;
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_XSAVE, KVM_SET_XSAVE, st->xsave)) < 0)
		return r;
	if (!(defer & KVM_SYNC_X86_EVENTS) &&
	    (r = vmm_fp_ioctl(v, VMM_FP_STEP_EVENTS, KVM_SET_VCPU_EVENTS, &st->events)) < 0)
		return r;
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_MP_STATE, KVM_SET_MP_STATE, &st->mp_state)) < 0)
		return r;
	if ((r = vmm_fp_ioctl(v, VMM_FP_STEP_DEBUGREGS, KVM_SET_DEBUGREGS, &st->debugregs)) < 0)
		return r;
	if (!(defer & KVM_SYNC_X86_REGS) &&
	    (r = vmm_fp_ioctl(v, VMM_FP_STEP_REGS, KVM_SET_REGS, &st->regs)) < 0)
		return r;

	if (defer & KVM_SYNC_X86_REGS)
		memcpy(&run->s.regs.regs, &st->regs, sizeof(st->regs));
	if (defer & KVM_SYNC_X86_SREGS)
		memcpy(&run->s.regs.sregs, &st->sregs, sizeof(st->sregs));
	if (defer & KVM_SYNC_X86_EVENTS)
		memcpy(&run->s.regs.events, &st->events, sizeof(st->events));
	run->kvm_dirty_regs |= defer;
	v->deferred = defer;
	st->trusted = 1;	/* KVM took every piece it was given; the deferred ones came from it */
	return 0;
}

/* Load what the last restore left in kvm_run now: KVM_RUN with immediate_exit runs no guest code. */
long vmm_fp_flush(struct vmm_fp_vcpu *v)
{
	long r;

	vmm_fp_begin(v);
	if (!(v->run->kvm_dirty_regs & VMM_FP_SYNC_ALL))
		return 0;
	v->run->immediate_exit = 1;
	r = vmm_fp_ioctl(v, VMM_FP_STEP_RUN, KVM_RUN, NULL);
	v->run->immediate_exit = 0;
	if (r == -EINTR) {
		v->run->exit_reason = KVM_EXIT_INTR;
		v->step = 0;
		r = 0;
	}
	if (r == 0 && (v->run->kvm_dirty_regs & VMM_FP_SYNC_ALL)) {
		v->step = VMM_FP_STEP_RUN;	/* KVM returned before loading them (mp_state?) */
		return -EAGAIN;
	}
	return r;
}
