// Empty on purpose: the XDP programs are the `lb-ebpf` binary (src/main.rs).
// A library target lets lb-userspace declare a build-dependency on this crate
// so cargo rebuilds the object when it changes.
#![no_std]
