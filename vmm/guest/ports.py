"""The port protocol between guests and the host (mirrors vmm/sdk/vmm.inc and vmm/sdk/vmm.h)."""

COM1_THR = 0x3F8   # console: 16550 transmit holding register (out)
COM1_LSR = 0x3FD   # line status (in): THR empty | transmitter empty
LSR_IDLE = 0x60
PORT_SYNC = 0x500  # out %eax: SYNC(value)
PORT_DONE = 0x501  # out: the guest finished
PORT_FAIL = 0x502  # out %eax: FAIL(code)
PORT_EXC = 0x503   # out from the CPL0 stubs: exception frame at RSP
PORT_ARG = 0x504   # out: select host argument n; in: its low 32 bits
PORT_ARG_HI = 0x505  # in: high 32 bits of the selected argument
PORT_ARG_COUNT = 0x506  # in: how many arguments the host gave

# int3 services of the CPL0 runtime (%eax = SVC_MAGIC, %rdi = op, %rsi = index, %rdx = value)
SVC_MAGIC = 0x564D4D53
SVC_RDMSR, SVC_WRMSR, SVC_READ_CR0, SVC_READ_CR4, SVC_TRIPLE_FAULT, SVC_XSETBV = range(6)
