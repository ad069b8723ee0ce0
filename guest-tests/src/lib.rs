//! guest-tests: QEMU guests running fio against vublk (filled by a later issue).
