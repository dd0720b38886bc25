/*
 * The run loop's hot path (vmm/guest/runner.py is its Python side): KVM_RUN until an exit the
 * caller must see, handling in C the exits that need no decision, so a guest that does port I/O
 * in a loop costs one ioctl per exit, as a plain C VMM does.
 *
 * Handled here (and counted in l->exits), the rest return to the caller:
 *   - a port write (KVM_EXIT_IO, OUT) to a port not in l->ports[]: ignored;
 *   - a port read (KVM_EXIT_IO, IN) from l->in_port: its first byte is l->in_value; from any
 *     other port not in l->ports[]: all ones, like an empty ISA bus;
 * KVM_RUN ending with EINTR (a signal; exit_reason is set to KVM_EXIT_INTR as vmm.vcpu.Vcpu.run
 * does) returns VMM_LOOP_TIMEOUT at or after l->deadline_ns (CLOCK_MONOTONIC), else goes back to
 * the caller, whose signal handlers (SIGINT) must run. After an exit handled here, immediate_exit
 * set by the timer also ends the loop at the deadline; before it the loop clears immediate_exit and
 * enters again. An exit for the caller is returned even at the deadline.
 * For an IO exit returned to the caller, l->port/size/count/out/value describe it (value: the
 * first `size` bytes of the data, little endian).
 *
 * The timeout: vmm_loop_arm() starts a repeating SIGALRM timer whose C handler sets
 * immediate_exit of the armed kvm_run. KVM checks immediate_exit on entry, so a signal that lands
 * just before the ioctl is not lost (a Python-level handler could not close that window).
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <time.h>
#include <linux/kvm.h>

#define VMM_LOOP_EXIT 0		/* run->exit_reason is for the caller */
#define VMM_LOOP_TIMEOUT 1	/* the deadline passed */
#define VMM_LOOP_MAX_PORTS 16

struct vmm_loop {
	int fd;				/* the vCPU */
	struct kvm_run *run;		/* its mapped kvm_run */
	long long deadline_ns;		/* CLOCK_MONOTONIC; 0: none */
	unsigned long long exits;	/* KVM_RUN returns, all of them */
	unsigned int nports;
	unsigned short ports[VMM_LOOP_MAX_PORTS];	/* IO exits on these go to the caller */
	unsigned short in_port;		/* reads from it return in_value */
	unsigned char in_value;
	/* the IO exit returned to the caller */
	unsigned short port;
	unsigned char size;
	unsigned char out;
	unsigned int count;
	unsigned long long value;
};

static struct kvm_run *volatile vmm_kick_run;
static int vmm_kick_installed;

static void vmm_kick_handler(int sig)
{
	(void)sig;
	if (vmm_kick_run)
		vmm_kick_run->immediate_exit = 1;
}

static long long vmm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* Arm the timeout of one run: first kick after first_ns, then every interval_ns. 0 or -errno. */
int vmm_loop_arm(struct vmm_loop *l, long long first_ns, long long interval_ns)
{
	struct itimerval it;

	if (!vmm_kick_installed) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = vmm_kick_handler;
		sigemptyset(&sa.sa_mask);
		/* no SA_RESTART: KVM_RUN must come back with EINTR */
		if (sigaction(SIGALRM, &sa, NULL) < 0)
			return -errno;
		vmm_kick_installed = 1;
	}
	vmm_kick_run = l->run;
	l->deadline_ns = vmm_now_ns() + first_ns;
	if (first_ns < 1000)
		first_ns = 1000;
	it.it_value.tv_sec = first_ns / 1000000000ll;
	it.it_value.tv_usec = first_ns % 1000000000ll / 1000;
	it.it_interval.tv_sec = interval_ns / 1000000000ll;
	it.it_interval.tv_usec = interval_ns % 1000000000ll / 1000;
	if (setitimer(ITIMER_REAL, &it, NULL) < 0) {
		vmm_kick_run = NULL;
		return -errno;
	}
	return 0;
}

/* Stop the timer of vmm_loop_arm; leaves immediate_exit clear. */
void vmm_loop_disarm(struct vmm_loop *l)
{
	struct itimerval it;
	memset(&it, 0, sizeof(it));
	setitimer(ITIMER_REAL, &it, NULL);
	vmm_kick_run = NULL;
	l->deadline_ns = 0;
	l->run->immediate_exit = 0;
}

static int vmm_loop_wanted(const struct vmm_loop *l, unsigned short port)
{
	for (unsigned int i = 0; i < l->nports; i++)
		if (l->ports[i] == port)
			return 1;
	return 0;
}

/* KVM_RUN until an exit for the caller (VMM_LOOP_EXIT), the deadline (VMM_LOOP_TIMEOUT) or an
 * ioctl error (-errno). */
long vmm_run_loop(struct vmm_loop *l)
{
	struct kvm_run *run = l->run;

	for (;;) {
		long r = ioctl(l->fd, KVM_RUN, 0);
		l->exits++;
		if (r < 0) {
			if (errno != EINTR)
				return -errno;
			run->exit_reason = KVM_EXIT_INTR;
			/* a signal: the timer's at the deadline, any other one (SIGINT) is the caller's to
			 * handle (Python runs its handlers when this call returns) */
			if (l->deadline_ns && vmm_now_ns() >= l->deadline_ns)
				return VMM_LOOP_TIMEOUT;
			run->immediate_exit = 0;
			return VMM_LOOP_EXIT;
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			unsigned char *data = (unsigned char *)run + run->io.data_offset;
			unsigned short port = run->io.port;
			if (vmm_loop_wanted(l, port)) {
				l->port = port;
				l->size = run->io.size;
				l->count = run->io.count;
				l->out = run->io.direction == KVM_EXIT_IO_OUT;
				l->value = 0;
				if (l->out && run->io.size <= 8)
					memcpy(&l->value, data, run->io.size);	/* x86: little endian */
				return VMM_LOOP_EXIT;
			}
			if (run->io.direction == KVM_EXIT_IO_IN) {
				if (port == l->in_port)
					data[0] = l->in_value;
				else
					memset(data, 0xff, (size_t)run->io.size * run->io.count);
			}	/* writes to other ports are ignored */
		} else if (run->exit_reason != KVM_EXIT_INTR) {
			return VMM_LOOP_EXIT;
		}
		/* handled here; the exit itself is complete before the deadline is looked at */
		if (run->exit_reason == KVM_EXIT_INTR || run->immediate_exit) {
			if (l->deadline_ns && vmm_now_ns() >= l->deadline_ns)
				return VMM_LOOP_TIMEOUT;
			run->immediate_exit = 0;
		}
	}
}
