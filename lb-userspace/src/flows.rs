//! The flow table (`XLB_FLOWS`) from the daemon's side: the array map
//! mapped into this process, read and changed in place under the same
//! protocol as the datapath (lb-ebpf/src/flows.rs): writes hold the locks
//! of the flow's two buckets (the lower first) and bump the slot's `seq` to
//! odd and back to even; reads retry while `seq` is odd or changes.
//!
//! Reading the table is a memory scan, not a syscall per entry: the sweep
//! of a million slots takes milliseconds.

use std::{
    hint::spin_loop,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _},
    ptr::{self, NonNull},
    sync::atomic::{fence, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Array, IterableMap as _, MapData};
use lb_common::{
    flow_table::{candidate, key_buckets, key_words, same_key, FLOW_CANDIDATES},
    FlowBucket, FlowKey, FlowSlot, FlowValue, FLOW_BUCKET_LOCK, FLOW_F_CLOSED, FLOW_WAYS,
};

#[derive(Debug, thiserror::Error)]
pub enum FlowTableError {
    #[error("mapping the flow table ({bytes} bytes) into memory")]
    Mmap {
        bytes: usize,
        source: std::io::Error,
    },
    #[error("the flow table's bucket {bucket} stayed locked for {waited:?}")]
    Locked { bucket: u32, waited: Duration },
    #[error("the flow table's buckets {bucket} and its pair are full")]
    BucketFull { bucket: u32 },
}

/// How long the daemon waits for a bucket lock the datapath holds (it
/// holds one for a slot write: nanoseconds).
const LOCK_WAIT: Duration = Duration::from_millis(100);
/// Reads of a slot that keep being torn by writers before giving up.
const READ_TRIES: u32 = 1000;

/// Bytes mapped for a table of `buckets` buckets.
fn mapping_len(buckets: u32) -> usize {
    buckets as usize * size_of::<FlowBucket>()
}

/// A shared mapping of `bytes` of the mmapable map `fd`; the caller unmaps
/// it (the kernel checks the length against the map).
fn map_shared(
    fd: std::os::fd::BorrowedFd<'_>,
    bytes: usize,
    prot: i32,
) -> Result<NonNull<u8>, FlowTableError> {
    // SAFETY: a fresh shared mapping of the map's fd; each owner unmaps it
    // in Drop, after which nothing reads it.
    let addr = unsafe {
        libc::mmap(
            ptr::null_mut(),
            bytes,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(FlowTableError::Mmap {
            bytes,
            source: std::io::Error::last_os_error(),
        });
    }
    NonNull::new(addr.cast::<u8>()).ok_or(FlowTableError::Mmap {
        bytes,
        source: std::io::Error::other("mmap returned null"),
    })
}

/// Slot `index` of the mapping: bucket `index / FLOW_WAYS`, way
/// `index % FLOW_WAYS` (the buckets' slots are contiguous).
fn slot_index((bucket, way): (u32, u32)) -> u32 {
    bucket * FLOW_WAYS + way
}

pub struct FlowTable {
    /// Keeps the map (and so the mapping's object) alive.
    _map: Array<MapData, FlowBucket>,
    base: NonNull<FlowSlot>,
    buckets: u32,
}

// SAFETY: the mapping is shared memory owned by this value; every access
// follows the table's protocol, whichever thread makes it.
unsafe impl Send for FlowTable {}

impl FlowTable {
    /// Maps `map` (created `BPF_F_MMAPABLE`, `buckets` entries: see
    /// `lb_common::flow_table::buckets_for`) into memory.
    pub fn new(map: Array<MapData, FlowBucket>, buckets: u32) -> Result<Self, FlowTableError> {
        let base = map_shared(
            map.map().fd().as_fd(),
            mapping_len(buckets),
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        Ok(Self {
            _map: map,
            base: base.cast(),
            buckets,
        })
    }

    fn slots(&self) -> u32 {
        self.buckets * FLOW_WAYS
    }

    fn slot(&self, index: u32) -> *mut FlowSlot {
        assert!(
            index < self.slots(),
            "flow slot {index} of {}",
            self.slots()
        );
        // SAFETY: in bounds of the mapping.
        unsafe { self.base.as_ptr().add(index as usize) }
    }

    fn seq(&self, index: u32) -> &AtomicU64 {
        // SAFETY: an 8-byte aligned u64 inside the mapping, which lives as
        // long as `self`; the datapath also only changes it atomically or
        // under the lock.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.slot(index)).seq) }
    }

    /// The `seq` of `bucket`'s first slot, which holds the bucket's lock.
    fn head(&self, bucket: u32) -> &AtomicU64 {
        self.seq(slot_index((bucket, 0)))
    }

    /// A whole copy of slot `index`, or `None` if writers kept tearing it.
    fn read(&self, index: u32) -> Option<FlowSlot> {
        let seq = self.seq(index);
        for _ in 0..READ_TRIES {
            let before = seq.load(Ordering::Acquire) & !FLOW_BUCKET_LOCK;
            if before & 1 == 0 {
                // SAFETY: in bounds; a torn copy is detected below and
                // thrown away (the seqlock pattern).
                let copy = unsafe { ptr::read_volatile(self.slot(index)) };
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) & !FLOW_BUCKET_LOCK == before {
                    return Some(copy);
                }
            }
            spin_loop();
        }
        None
    }

    fn pair(&self, key: &FlowKey) -> [u32; 2] {
        key_buckets(key, self.buckets)
    }

    /// The slot indexes of a flow's candidates.
    fn candidates(pair: [u32; 2]) -> impl Iterator<Item = u32> {
        (0..FLOW_CANDIDATES).map(move |i| slot_index(candidate(&pair, i)))
    }

    /// Runs `f` with the locks of both buckets of `pair` held.
    fn locked<R>(&self, pair: [u32; 2], f: impl FnOnce() -> R) -> Result<R, FlowTableError> {
        let (low, high) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
        self.lock_one(low)?;
        if high != low {
            if let Err(e) = self.lock_one(high) {
                self.unlock_one(low);
                return Err(e);
            }
        }
        let result = f();
        if high != low {
            self.unlock_one(high);
        }
        self.unlock_one(low);
        Ok(result)
    }

    /// Releases the lock `lock_one` took.
    fn unlock_one(&self, bucket: u32) {
        self.head(bucket)
            .fetch_and(!FLOW_BUCKET_LOCK, Ordering::Release);
    }

    fn lock_one(&self, bucket: u32) -> Result<(), FlowTableError> {
        let head = self.head(bucket);
        let started = Instant::now();
        loop {
            let seq = head.load(Ordering::Relaxed);
            if seq & FLOW_BUCKET_LOCK == 0
                && head
                    .compare_exchange_weak(
                        seq,
                        seq | FLOW_BUCKET_LOCK,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                break;
            }
            if started.elapsed() > LOCK_WAIT {
                return Err(FlowTableError::Locked {
                    bucket,
                    waited: started.elapsed(),
                });
            }
            spin_loop();
        }
        Ok(())
    }

    /// Writes slot `index` of a bucket whose lock is held.
    fn write_locked(&self, index: u32, key: &FlowKey, value: &FlowValue) {
        let seq = self.seq(index);
        let s = seq.load(Ordering::Relaxed);
        seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let slot = self.slot(index);
        // SAFETY: in bounds; the bucket lock keeps other writers out and
        // the odd seq tells readers the slot is changing.
        unsafe {
            ptr::write_volatile(&raw mut (*slot).key, *key);
            ptr::write_volatile(&raw mut (*slot).value, *value);
        }
        seq.store(s + 2, Ordering::Release);
    }

    /// The slot of `key` in its buckets, read under their locks.
    fn index_locked(&self, pair: [u32; 2], key: &FlowKey) -> Option<u32> {
        let words = key_words(key);
        Self::candidates(pair).find(|&i| {
            // SAFETY: in bounds; keys only change under the lock we hold.
            let k = unsafe { ptr::read_volatile(&raw const (*self.slot(i)).key) };
            same_key(&key_words(&k), &words)
        })
    }

    pub fn get(&self, key: &FlowKey) -> Option<FlowValue> {
        Self::candidates(self.pair(key))
            .filter_map(|i| self.read(i))
            .find(|s| s.key.family != 0 && s.key == *key)
            .map(|s| s.value)
    }

    /// Copies of the slots that hold a flow, with their indexes.
    fn occupied(&self) -> impl Iterator<Item = (u32, FlowSlot)> + '_ {
        (0..self.slots())
            .filter_map(|i| self.read(i).map(|s| (i, s)))
            .filter(|(_, s)| s.key.family != 0)
    }

    /// Every flow in the table with its (bucket, way).
    pub fn placed(&self) -> Vec<((u32, u32), FlowKey, FlowValue)> {
        self.occupied()
            .map(|(i, s)| ((i / FLOW_WAYS, i % FLOW_WAYS), s.key, s.value))
            .collect()
    }

    /// Every flow in the table.
    pub fn entries(&self) -> Vec<(FlowKey, FlowValue)> {
        self.occupied().map(|(_, s)| (s.key, s.value)).collect()
    }

    pub fn count(&self) -> usize {
        self.occupied().count()
    }

    /// Empties the slot of `key`; `Ok(true)` if this call removed it.
    pub fn remove(&self, key: &FlowKey) -> Result<bool, FlowTableError> {
        let pair = self.pair(key);
        self.locked(pair, || match self.index_locked(pair, key) {
            Some(i) => {
                self.write_locked(i, &FlowKey::default(), &FlowValue::default());
                true
            }
            None => false,
        })
    }

    /// Copies flows into the slots they held in a table with the same
    /// addressing (bucket, way), here empty and not yet read by a program;
    /// returns how many it copied (a slot already in use keeps its flow).
    pub fn place(
        &self,
        flows: &[((u32, u32), FlowKey, FlowValue)],
    ) -> Result<usize, FlowTableError> {
        let mut copied = 0;
        for &((bucket, way), key, value) in flows {
            let index = slot_index((bucket, way));
            let free = self.locked([bucket, bucket], || {
                let free = self.is_free_locked(index);
                if free {
                    self.write_locked(index, &key, &value);
                }
                free
            })?;
            copied += usize::from(free);
        }
        Ok(copied)
    }

    /// Whether slot `index`, in a bucket whose lock is held, is empty.
    fn is_free_locked(&self, index: u32) -> bool {
        // SAFETY: in bounds; keys only change under the lock the caller
        // holds.
        unsafe { ptr::read_volatile(&raw const (*self.slot(index)).key.family) == 0 }
    }

    /// Writes `key`'s entry into its slot if it has one and `overwrite`
    /// (`Ok(true)`; `Ok(false)` if it has one and not `overwrite`), else
    /// into an empty slot of its buckets (`Ok(true)`).
    fn write_entry(
        &self,
        key: &FlowKey,
        value: &FlowValue,
        overwrite: bool,
    ) -> Result<bool, FlowTableError> {
        let pair = self.pair(key);
        self.locked(pair, || {
            let index = match self.index_locked(pair, key) {
                Some(_) if !overwrite => return Ok(false),
                Some(i) => Some(i),
                None => Self::candidates(pair).find(|&i| self.is_free_locked(i)),
            };
            match index {
                Some(i) => {
                    self.write_locked(i, key, value);
                    Ok(true)
                }
                None => Err(FlowTableError::BucketFull { bucket: pair[0] }),
            }
        })?
    }

    /// Writes `key`'s entry into an empty slot of its buckets unless they
    /// hold it already: `Ok(false)` then, and the entry there stays.
    pub fn insert_new(&self, key: &FlowKey, value: &FlowValue) -> Result<bool, FlowTableError> {
        self.write_entry(key, value, false)
    }

    /// Writes `key`'s entry: over its slot, else into an empty one of its
    /// buckets. (The datapath evicts when both are full; the daemon writes
    /// entries only in tests and migrations and never evicts.)
    pub fn insert(&self, key: &FlowKey, value: &FlowValue) -> Result<(), FlowTableError> {
        self.write_entry(key, value, true).map(|_| ())
    }
}

impl Drop for FlowTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), mapping_len(self.buckets)) };
    }
}

/// Bytes of a `XLB_FLOWS` entry (a bucket of 4 slots of 72 bytes) in
/// builds before the flow table's slots became one 64-byte cache line.
/// A daemon adopting such a table migrates it (see `LegacyTable`).
pub const LEGACY_BUCKET_BYTES: u32 = 288;
/// Byte offsets in a slot of that layout: `seq` u64 at 0 (bit 63 of a
/// bucket's first slot was its lock, as now), the 40-byte key at 8, then
/// backend u32, generation u32, last_seen_ns u64 and flags u64.
const LEGACY_SLOT_BYTES: usize = 72;
const LEGACY_KEY: usize = 8;
const LEGACY_BACKEND: usize = 48;
const LEGACY_GENERATION: usize = 52;
const LEGACY_LAST_SEEN: usize = 56;
const LEGACY_FLAGS: usize = 64;

/// Bytes of a table of the older layout with `buckets` buckets.
fn legacy_len(buckets: u32) -> usize {
    buckets as usize * LEGACY_BUCKET_BYTES as usize
}

/// Byte offset of slot (bucket, way) in a table of the older layout.
fn legacy_offset((bucket, way): (u32, u32)) -> usize {
    legacy_len(bucket) + way as usize * LEGACY_SLOT_BYTES
}

/// A flow table of the 72-byte-slot layout, mapped read-only: what a
/// daemon of this build copies into its own table when it adopts the pins
/// of an older one. Its addressing (bucket count for a flow table size,
/// `slot_hash`, `bucket_pair`, ways) is the current one, so every flow
/// goes to the same bucket and way.
pub struct LegacyTable {
    /// Keeps the map (and so the mapping's object) alive.
    map: MapData,
    base: NonNull<u8>,
    buckets: u32,
}

// SAFETY: a read-only mapping owned by this value.
unsafe impl Send for LegacyTable {}

impl LegacyTable {
    /// Maps `map` (`buckets` entries of `LEGACY_BUCKET_BYTES`) read-only.
    pub fn new(map: MapData, buckets: u32) -> Result<Self, FlowTableError> {
        let base = map_shared(map.fd().as_fd(), legacy_len(buckets), libc::PROT_READ)?;
        Ok(Self { map, base, buckets })
    }

    /// The kernel's id of the table's map (programs that use it list it).
    pub fn map_id(&self) -> Result<u32, aya::maps::MapError> {
        Ok(self.map.info()?.id())
    }

    /// Every flow with its (bucket, way), each read whole (the seqlock
    /// pattern: a slot a writer keeps tearing is left out; a program still
    /// writing this table is why `Dataplane::finish_migration` reads it a
    /// second time).
    pub fn flows(&self) -> Vec<((u32, u32), FlowKey, FlowValue)> {
        let mut out = Vec::new();
        for bucket in 0..self.buckets {
            for way in 0..FLOW_WAYS {
                if let Some((key, value)) = self.read(bucket, way) {
                    out.push(((bucket, way), key, value));
                }
            }
        }
        out
    }

    fn read(&self, bucket: u32, way: u32) -> Option<(FlowKey, FlowValue)> {
        let offset = legacy_offset((bucket, way));
        // SAFETY: inside the mapping (bucket < buckets, way < FLOW_WAYS);
        // slots start 8-byte aligned (the mapping is page-aligned and 72 is
        // a multiple of 8), so every field below is aligned for its type.
        let slot = unsafe { self.base.as_ptr().add(offset) };
        // SAFETY: as above; the program changes seq atomically or under
        // the bucket lock.
        let seq = unsafe { AtomicU64::from_ptr(slot.cast::<u64>()) };
        for _ in 0..READ_TRIES {
            let before = seq.load(Ordering::Acquire) & !FLOW_BUCKET_LOCK;
            if before & 1 == 0 {
                // SAFETY: as above; a torn copy is thrown away below.
                let (key, backend, generation, last_seen_ns, flags) = unsafe {
                    (
                        ptr::read_volatile(slot.add(LEGACY_KEY).cast::<FlowKey>()),
                        ptr::read_volatile(slot.add(LEGACY_BACKEND).cast::<u32>()),
                        ptr::read_volatile(slot.add(LEGACY_GENERATION).cast::<u32>()),
                        ptr::read_volatile(slot.add(LEGACY_LAST_SEEN).cast::<u64>()),
                        ptr::read_volatile(slot.add(LEGACY_FLAGS).cast::<u64>()),
                    )
                };
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) & !FLOW_BUCKET_LOCK != before {
                    spin_loop();
                    continue;
                }
                // An empty slot, or a backend id no build could have made.
                let backend = u16::try_from(backend)
                    .ok()
                    .filter(|&b| u32::from(b) < lb_common::MAX_BACKENDS)?;
                return (key.family != 0).then_some((
                    key,
                    FlowValue {
                        backend,
                        // FLOW_F_CLOSED kept its value (the only flag).
                        flags: if flags & u64::from(FLOW_F_CLOSED) != 0 {
                            FLOW_F_CLOSED
                        } else {
                            0
                        },
                        generation,
                        last_seen_ns,
                    },
                ));
            }
            spin_loop();
        }
        None
    }
}

impl Drop for LegacyTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), legacy_len(self.buckets)) };
    }
}

/// A flow table of the 72-byte-slot layout made the way an older build's
/// program made it (an mmapable array, pinned): for tests of the
/// migration (tests/datapath.rs, `xdplb-bench legacy-flow-table`), never
/// used by the daemon.
#[doc(hidden)]
pub struct LegacyFixture {
    fd: std::os::fd::OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

/// bpf(2) command `cmd` with the 128-byte attribute at `attr`: its return
/// value, or the OS error.
///
/// # Safety
/// `attr` points at 128 readable bytes, a `bpf_attr` for `cmd` (zero past
/// what `cmd` reads) whose pointers are live.
pub(crate) unsafe fn bpf(cmd: libc::c_long, attr: *const u8) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, 128) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// `bpf` for a command that returns a new fd (BPF_MAP_CREATE,
/// BPF_PROG_LOAD), owned from here.
///
/// # Safety
/// As `bpf`.
pub(crate) unsafe fn bpf_fd(
    cmd: libc::c_long,
    attr: *const u8,
) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: the caller's; a non-negative return of these commands is a
    // new fd that nothing else owns.
    unsafe {
        let fd = bpf(cmd, attr)?;
        Ok(std::os::fd::OwnedFd::from_raw_fd(fd as i32))
    }
}

/// Pins the BPF object `fd` at `path` (BPF_OBJ_PIN).
pub(crate) fn bpf_pin(
    fd: std::os::fd::BorrowedFd<'_>,
    path: &std::path::Path,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // BPF_OBJ_PIN (6): pathname, bpf_fd.
    let mut pin = [0u64; 16];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd.as_raw_fd() as u64;
    // SAFETY: a zero-padded bpf_attr of 128 bytes; the path lives.
    unsafe { bpf(6, pin.as_ptr().cast()) }?;
    Ok(())
}

impl LegacyFixture {
    /// Creates the table (`buckets` entries of `LEGACY_BUCKET_BYTES`),
    /// writes `flows` at their (bucket, way) and pins it at `path`.
    pub fn pin(
        path: &std::path::Path,
        buckets: u32,
        flows: &[((u32, u32), FlowKey, FlowValue)],
    ) -> std::io::Result<Self> {
        // BPF_MAP_CREATE (0): map_type ARRAY (2), key 4, value size, max
        // entries, map_flags BPF_F_MMAPABLE; the rest of the attribute 0.
        let mut attr = [0u32; 32];
        attr[..5].copy_from_slice(&[2, 4, LEGACY_BUCKET_BYTES, buckets, 1 << 10]);
        // SAFETY: a zero-padded bpf_attr of 128 bytes.
        let fd = unsafe { bpf_fd(0, attr.as_ptr().cast()) }?;
        let len = legacy_len(buckets);
        let fixture = Self {
            base: map_shared(fd.as_fd(), len, libc::PROT_READ | libc::PROT_WRITE)
                .map_err(std::io::Error::other)?,
            len,
            fd,
        };
        for &(at, key, value) in flows {
            fixture.write(at, &key, &value);
        }
        bpf_pin(fixture.fd.as_fd(), path)?;
        Ok(fixture)
    }

    /// Loads a program that uses the table, as the older build's program
    /// did: the kernel lists the table's map among the program's maps
    /// while the returned fd keeps it loaded (what `Dataplane` asks to tell
    /// whether the older program may still run).
    pub fn program_using_it(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        // bpf_insn words: code, dst_reg | src_reg << 4, off, imm.
        let insn = |code: u64, regs: u64, imm: u64| code | (regs << 8) | (imm << 32);
        let insns = [
            // r1 = the map (BPF_LD_IMM64, src_reg BPF_PSEUDO_MAP_FD).
            insn(0x18, 1 | (1 << 4), self.fd.as_raw_fd() as u64),
            0,
            // r0 = 0; exit.
            insn(0xb7, 0, 0),
            insn(0x95, 0, 0),
        ];
        let license = c"GPL";
        // BPF_PROG_LOAD (5): prog_type BPF_PROG_TYPE_SOCKET_FILTER (1),
        // insn_cnt, insns, license; the rest of the attribute 0.
        let mut attr = [0u64; 16];
        attr[0] = 1 | ((insns.len() as u64) << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        // SAFETY: a zero-padded bpf_attr of 128 bytes, pointing at live
        // buffers.
        unsafe { bpf_fd(5, attr.as_ptr().cast()) }
    }

    /// Writes one slot as the older program did (seq 2: written, even).
    pub fn write(&self, (bucket, way): (u32, u32), key: &FlowKey, v: &FlowValue) {
        let offset = legacy_offset((bucket, way));
        assert!(
            offset + LEGACY_SLOT_BYTES <= self.len,
            "slot ({bucket}, {way})"
        );
        // SAFETY: inside the mapping (checked), each field at its aligned
        // offset (see `LegacyTable::read`).
        unsafe {
            let p = self.base.as_ptr().add(offset);
            ptr::write_volatile(p.cast::<u64>(), 2);
            ptr::write_volatile(p.add(LEGACY_KEY).cast::<FlowKey>(), *key);
            ptr::write_volatile(p.add(LEGACY_BACKEND).cast::<u32>(), v.backend_id());
            ptr::write_volatile(p.add(LEGACY_GENERATION).cast::<u32>(), v.generation);
            ptr::write_volatile(p.add(LEGACY_LAST_SEEN).cast::<u64>(), v.last_seen_ns);
            ptr::write_volatile(p.add(LEGACY_FLAGS).cast::<u64>(), u64::from(v.flags));
        }
    }
}

impl Drop for LegacyFixture {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `pin`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
