#!/bin/busybox sh
# /init of the test-kernels initramfs (busybox). Loads the modules, mounts the host's root read-only
# over virtio-9p (QEMU) or the harness's root disk image (Bochs: vmm_media=disk on the kernel command
# line) with a tmpfs overlay for writes, and runs tests/kernels/inner.sh in it. Results go to the
# writable "results" share or disk; lines starting with "VMM-KERNELS:" are markers the host times.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mark() { echo "VMM-KERNELS: $*"; }
fail() { mark "fatal $*"; sync; poweroff -f; }
mark "init"
for m in $(cat /modules.load); do
    modprobe "$m" || fail "modprobe $m failed"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading the modules: $(dmesg | grep -i -E 'kvm|svm|vmx' | tail -3)"
mark "kvm-ready"
mkdir -p /results /mnt/ro /mnt/rw /newroot
case " $(cat /proc/cmdline) " in
*" vmm_media=disk "*)
    # Bochs (kvm_intel) has no virtio-9p: the harness's ext4 images on IDE, found by label
    for l in vmm-root vmm-results; do
        n=0
        until findfs LABEL=$l > /dev/null 2>&1; do
            n=$((n + 1)); [ $n -gt 120 ] && fail "no disk labelled $l: $(cat /proc/partitions | tr '\n' ' ')"
            sleep 1
        done
    done
    mount -t ext4 "$(findfs LABEL=vmm-results)" /results || fail "cannot mount the results disk"
    mount -t ext4 -o ro,noload "$(findfs LABEL=vmm-root)" /mnt/ro || fail "cannot mount the root disk" ;;
*)
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results \
        || fail "cannot mount the results share"
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /mnt/ro \
        || fail "cannot mount the host's root" ;;
esac
mount -t tmpfs -o size=1g tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/ro,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot \
    || fail "cannot mount the overlay"
mount --bind /proc /newroot/proc
mount --bind /sys /newroot/sys
mount --bind /dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/vmm-results
mount -t tmpfs tmpfs /newroot/dev/shm
mount --bind /results /newroot/vmm-results
dmesg > /results/dmesg.txt
. /results/run.env
mark "chroot $PROJECT"
chroot /newroot /bin/bash "$PROJECT/tests/kernels/inner.sh" /vmm-results
mark "inner-exit $?"
dmesg > /results/dmesg.txt
sync
umount /newroot/vmm-results /results 2>/dev/null
poweroff -f
