//! The loaded XDP program and typed handles to its maps.
//!
//! This is the only module that talks to aya. It knows map layouts, not
//! policy: which ids to use and in what order to write is `state`'s job.

use std::{
    collections::BTreeMap,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, DevMap, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLinkId,
        ProgramError, Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    flow_table::buckets_for, globals, maps, programs, ring_chunk_index, ring_chunks_for, Backend,
    Counters, FlowBucket, FlowKey, FlowValue, Reason, RingChunk, VipInfo, VipKey, MAX_BACKENDS,
    MAX_TX_PORTS, REASON_SLOTS, RING_CHUNK_SLOTS, VIP_FILTER_WORDS,
};
use lb_common::{vip_index_slot, VipEntry, VIP_INDEX_SHARED, VIP_INDEX_SLOTS};

use crate::{
    config::{DatapathSettings, XdpMode},
    flows::{FlowTable, FlowTableError, LegacyTable, LEGACY_BUCKET_BYTES},
};

/// The compiled XDP object, built by build.rs through aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object")]
    Load(#[from] EbpfError),
    #[error("{context}")]
    Program {
        context: String,
        source: ProgramError,
    },
    #[error("{context}")]
    Map { context: String, source: MapError },
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the XDP object")]
    MissingProgram(&'static str),
    #[error("writing tx port {port} -> ifindex {ifindex}")]
    TxPort {
        port: u32,
        ifindex: u32,
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("per-CPU values: {0}")]
    Cpus(String),
    #[error(
        "pinned map {path} has {what} {got}, this configuration needs {want}; it was \
         created by another layout or other datapath settings: restore those settings, \
         or remove the pinned state (`xdplb run` without --persist on exit, or \
         `rm -r {dir}`) and accept that established flows are lost"
    )]
    PinnedMismatch {
        path: String,
        dir: String,
        what: &'static str,
        got: u32,
        want: u32,
    },
    #[error("{context}")]
    Pin {
        context: String,
        source: std::io::Error,
    },
    #[error("{context}")]
    Link {
        context: String,
        source: aya::programs::links::LinkError,
    },
    #[error(transparent)]
    Flows(#[from] FlowTableError),
    #[error("ring of {got} slots written, the datapath ring has {want}")]
    RingSize { got: usize, want: u32 },
}

fn map_err(context: impl Into<String>) -> impl FnOnce(MapError) -> DataplaneError {
    let context = context.into();
    move |source| DataplaneError::Map { context, source }
}

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
    /// A pinned link from a previous daemon now runs this program (its
    /// mode is whatever it was attached with).
    Replaced,
}

/// (key size, value size, max entries) each map must have.
fn expected_layout(name: &str, settings: &DatapathSettings) -> (u32, u32, u32) {
    let chunks = ring_chunks_for(settings.ring_size);
    let sz = |n: usize| n as u32;
    match name {
        maps::VIPS => (
            sz(size_of::<VipKey>()),
            sz(size_of::<VipInfo>()),
            settings.max_vips,
        ),
        maps::BACKENDS => (4, sz(size_of::<Backend>()), MAX_BACKENDS),
        maps::RINGS => (
            4,
            sz(size_of::<RingChunk>()),
            settings.max_vips * 2 * chunks,
        ),
        maps::FLOWS => (
            4,
            sz(size_of::<FlowBucket>()),
            buckets_for(settings.flow_table_size),
        ),
        maps::TX_PORTS => (4, 8, MAX_TX_PORTS),
        maps::VIP_RETIRED => (4, sz(size_of::<Counters>()), settings.max_vips),
        maps::BACKEND_STATS => (4, sz(size_of::<Counters>()), MAX_BACKENDS),
        maps::REASON_STATS => (4, 8, REASON_SLOTS),
        maps::BACKEND_EXPIRED => (4, 8, MAX_BACKENDS),
        maps::VIP_FILTER => (4, 8, VIP_FILTER_WORDS),
        maps::CLOCK => (4, 8, 1),
        maps::VIP_INDEX => (4, 4, VIP_INDEX_SLOTS),
        maps::VIP_BY_ID => (4, sz(size_of::<VipEntry>()), settings.max_vips),
        other => unreachable!("map {other} has no expected layout"),
    }
}

/// A link `Dataplane::attach` made.
enum MadeLink {
    /// Pinned: the pin is its only reference.
    Pinned(PathBuf),
    /// Held by the program (no pin directory).
    Owned(XdpLinkId),
}

pub struct Dataplane {
    ebpf: Ebpf,
    settings: DatapathSettings,
    /// Where maps and links are pinned (`None`: nothing is pinned and
    /// everything goes when the process does).
    pin_dir: Option<PathBuf>,
    /// The maps were pinned already: a previous daemon's state was adopted.
    adopted: bool,
    /// Pinned XDP links this daemon owns.
    links: Vec<PathBuf>,
    /// Links `attach` made in this process (not taken over), by interface:
    /// the ones `detach` can take back.
    made: std::collections::HashMap<String, MadeLink>,
    /// Links `attach` took over from a pin, by interface: the pin and the
    /// program's handle on the link, for `release`.
    taken_over: std::collections::HashMap<String, (PathBuf, XdpLinkId)>,
    backend_expired: Array<MapData, u64>,
    vip_filter: Array<MapData, u64>,
    clock: Array<MapData, u64>,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_index: Array<MapData, u32>,
    vip_by_id: Array<MapData, VipEntry>,
    /// The VIPs (key, id) of each `XLB_VIP_INDEX` slot in use, as written.
    index_vips: BTreeMap<u32, Vec<(VipKey, u32)>>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, RingChunk>,
    flows: FlowTable,
    /// A pinned flow table of the older layout found by `load`, until
    /// `finish_migration`.
    legacy: Option<Legacy>,
    /// The pin of older per-CPU VIP counters `load` converted, which
    /// `finish_migration` removes.
    legacy_vip_stats: Option<PathBuf>,
    tx_ports: DevMap<MapData>,
    vip_retired: Array<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, u64>,
}

macro_rules! take_map {
    ($ebpf:expr, $name:expr) => {{
        let map = $ebpf
            .take_map($name)
            .ok_or(DataplaneError::MissingMap($name))?;
        map.try_into().map_err(map_err(format!("map {}", $name)))?
    }};
}

impl Dataplane {
    /// Loads the object with the given sizes and verifies the program.
    ///
    /// With `pin_dir`, every map is pinned there, and maps already pinned
    /// there (by a previous daemon) are reused as they are: flows, counters
    /// and tables survive. Their layout is checked first.
    pub fn load(
        settings: DatapathSettings,
        pin_dir: Option<&Path>,
    ) -> Result<Self, DataplaneError> {
        let chunks = ring_chunks_for(settings.ring_size);
        let buckets = buckets_for(settings.flow_table_size);
        let mut adopted = false;
        let mut legacy = None;
        let mut legacy_vip_stats = None;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(globals::RING_SIZE, &settings.ring_size, true)
            .override_global(globals::RING_CHUNKS, &chunks, true)
            .override_global(globals::FLOW_BUCKETS, &buckets, true)
            .map_max_entries(maps::VIPS, settings.max_vips)
            .map_max_entries(maps::VIP_RETIRED, settings.max_vips)
            .map_max_entries(maps::VIP_BY_ID, settings.max_vips)
            .map_max_entries(maps::RINGS, settings.max_vips * 2 * chunks)
            .map_max_entries(maps::FLOWS, buckets);
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::Pin {
                context: format!("creating {}", dir.display()),
                source,
            })?;
            for name in maps::ALL {
                let path = dir.join(name);
                if name == maps::FLOWS {
                    legacy = open_legacy_flows(dir, buckets)?;
                }
                // The older table at XLB_FLOWS is judged by its own layout.
                let older_here =
                    name == maps::FLOWS && legacy.as_ref().is_some_and(|l| l.stage == Stage::Fresh);
                if path.exists() {
                    if !older_here {
                        check_pinned(&path, dir, expected_layout(name, &settings))?;
                    }
                    adopted = true;
                }
                loader.map_pin_path(name, path);
            }
            let path = dir.join(maps::LEGACY_VIP_STATS);
            if path.exists() {
                check_pinned(
                    &path,
                    dir,
                    (4, size_of::<Counters>() as u32, settings.max_vips),
                )?;
                legacy_vip_stats = Some(path);
            }
        }
        // The older table's pin moves aside (not away: a failed load puts
        // it back), so the loader pins a new table in its place.
        let moved = legacy.as_ref().filter(|l| l.stage == Stage::Fresh);
        if let Some(l) = moved {
            rename_pin(&l.moved_from, &l.pin)?;
        }
        match Self::load_object(
            loader,
            settings,
            buckets,
            pin_dir,
            adopted,
            legacy.as_ref(),
            legacy_vip_stats.as_deref(),
        ) {
            Ok(mut dp) => {
                dp.legacy = legacy;
                dp.legacy_vip_stats = legacy_vip_stats;
                Ok(dp)
            }
            Err(e) => {
                // The loader may have pinned a new table already: the
                // rename replaces it.
                if let Some(l) = moved {
                    if let Err(r) = rename_pin(&l.pin, &l.moved_from) {
                        tracing::error!("putting the older flow table's pin back: {r}");
                    }
                }
                Err(e)
            }
        }
    }

    /// The part of `load` from the loader on: loads and verifies the
    /// program, takes the maps, copies an older table's flows and converts
    /// older VIP counters (`convert_vip_stats`).
    fn load_object(
        mut loader: EbpfLoader<'_>,
        settings: DatapathSettings,
        buckets: u32,
        pin_dir: Option<&Path>,
        adopted: bool,
        legacy: Option<&Legacy>,
        legacy_vip_stats: Option<&Path>,
    ) -> Result<Self, DataplaneError> {
        let mut ebpf = loader.load(OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(programs::LB)
            .ok_or(DataplaneError::MissingProgram(programs::LB))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                context: format!("program {} is not XDP", programs::LB),
                source,
            })?;
        program.load().map_err(|source| DataplaneError::Program {
            context: format!("verifying program {}", programs::LB),
            source,
        })?;
        let mut dp = Self {
            settings,
            pin_dir: pin_dir.map(Path::to_path_buf),
            adopted,
            links: Vec::new(),
            made: std::collections::HashMap::new(),
            taken_over: std::collections::HashMap::new(),
            vips: take_map!(ebpf, maps::VIPS),
            vip_index: take_map!(ebpf, maps::VIP_INDEX),
            vip_by_id: take_map!(ebpf, maps::VIP_BY_ID),
            index_vips: BTreeMap::new(),
            backends: take_map!(ebpf, maps::BACKENDS),
            rings: take_map!(ebpf, maps::RINGS),
            flows: FlowTable::new(take_map!(ebpf, maps::FLOWS), buckets)?,
            legacy: None,
            legacy_vip_stats: None,
            tx_ports: take_map!(ebpf, maps::TX_PORTS),
            vip_retired: take_map!(ebpf, maps::VIP_RETIRED),
            backend_stats: take_map!(ebpf, maps::BACKEND_STATS),
            reason_stats: take_map!(ebpf, maps::REASON_STATS),
            backend_expired: take_map!(ebpf, maps::BACKEND_EXPIRED),
            vip_filter: take_map!(ebpf, maps::VIP_FILTER),
            clock: take_map!(ebpf, maps::CLOCK),
            ebpf,
        };
        dp.sync_vip_index()?;
        if let Some(path) = legacy_vip_stats {
            dp.convert_vip_stats(path)?;
        }
        if let Some(l) = legacy {
            let flows = l.table.flows();
            let (copied, full) = if l.stage == Stage::Fresh {
                // Nothing reads the new table yet: every flow to its slot.
                (dp.flows.place(&flows)?, 0)
            } else {
                // A start that stopped half-way left the new table, which
                // an egress link, or after a takeover every link, may use
                // already: only what it lacks, wherever it fits.
                dp.copy_flows(&flows, false)?
            };
            tracing::info!(
                "copied {copied} of {} flows from the pinned flow table of 72-byte slots \
                 ({}) into the new one{}{}",
                flows.len(),
                l.pin.display(),
                match l.stage {
                    Stage::Fresh => "",
                    Stage::Copied =>
                        " (going on with a migration a start left before its takeover)",
                    Stage::TakenOver =>
                        " (going on with a migration a start left after its takeover)",
                },
                if full > 0 {
                    format!("; {full} found both their buckets full")
                } else {
                    String::new()
                }
            );
        }
        Ok(dp)
    }

    /// Copies `flows` into the new table: over the entries it has if
    /// `overwrite`, else only those it lacks. Returns how many it wrote and
    /// how many found both their buckets full.
    fn copy_flows(
        &self,
        flows: &[((u32, u32), FlowKey, FlowValue)],
        overwrite: bool,
    ) -> Result<(usize, usize), DataplaneError> {
        let (mut copied, mut full) = (0, 0);
        for (_, key, value) in flows {
            let written = if overwrite {
                self.flows.insert(key, value).map(|()| true)
            } else {
                self.flows.insert_new(key, value)
            };
            match written {
                Ok(true) => copied += 1,
                Ok(false) => {}
                Err(FlowTableError::BucketFull { .. }) => full += 1,
                Err(e) => return Err(e.into()),
            }
        }
        Ok((copied, full))
    }

    /// During a migration, just before the VIP interface's link is taken
    /// over (the older program still runs there, this one not yet): brings
    /// every flow of the older table up to date in the new one (made,
    /// closed or rescheduled since `load` copied it). Returns how many
    /// flows it wrote; 0 when not migrating, or when an earlier start had
    /// taken the links over already (this program's entries win).
    pub fn sync_migration(&mut self) -> Result<usize, DataplaneError> {
        let Some(l) = self.legacy.as_ref().filter(|l| l.stage != Stage::TakenOver) else {
            return Ok(0);
        };
        Ok(self.copy_flows(&l.table.flows(), true)?.0)
    }

    /// Records, right after the VIP interface's link runs this program,
    /// that the older program no longer does (its table's pin is renamed
    /// `LEGACY_FLOWS_PIN_TAKEN_OVER`): a start that goes on with this
    /// migration after a crash must not overwrite the new table from the
    /// older one.
    pub fn mark_taken_over(&mut self) -> Result<(), DataplaneError> {
        match self.legacy.as_mut().filter(|l| l.stage != Stage::TakenOver) {
            Some(l) => l.take_over(),
            None => Ok(()),
        }
    }

    /// The older table's pin while a migration is under way (where
    /// `finish_migration` leaves it if it fails).
    pub fn migration_pin(&self) -> Option<&Path> {
        self.legacy.as_ref().map(|l| l.pin.as_path())
    }

    /// After an adopted start that found a flow table of the older layout
    /// (`LegacyTable`), once every link runs this program: copies the flows
    /// the older program made since `load` copied the table (those this
    /// program has not made itself meanwhile), then removes the older
    /// table's pin. `None` if there was nothing to migrate. Also removes
    /// the pin of older VIP counters `load` converted.
    pub fn finish_migration(&mut self) -> Result<Option<Migration>, DataplaneError> {
        // Older VIP counters `load` converted: nothing but the older
        // program counted them, which runs no more.
        if let Some(path) = self.legacy_vip_stats.take() {
            remove_pin(&path)?;
            tracing::info!(
                "removed {}: VIP counters are their backends' sums now",
                path.display()
            );
        }
        let Some(l) = self.legacy.take() else {
            return Ok(None);
        };
        let (late, dropped) = self.copy_flows(&l.table.flows(), false)?;
        remove_pin(&l.pin)?;
        Ok(Some(Migration { late, dropped }))
    }

    /// Undoes the pin move of a migrating load that will not finish (the
    /// start failed before `finish_migration`): if this load started the
    /// migration and no link runs this program, the older table's pin goes
    /// back where it was, in place of the new table's, for the program
    /// that still uses it. Otherwise both pins stay and the next start
    /// goes on with the migration: a link runs this program (an egress
    /// link taken over, or the takeover done), or an earlier start made
    /// the new table, which a link it took over may use still.
    pub fn abandon_migration(&mut self) -> Result<(), DataplaneError> {
        if let Some(l) = self.legacy.take() {
            if l.stage == Stage::Fresh && self.links.is_empty() {
                // Replaces the new table's pin in one step.
                rename_pin(&l.pin, &l.moved_from)?;
            }
        }
        Ok(())
    }

    /// Makes `XLB_VIP_INDEX` and `XLB_VIP_BY_ID` match `XLB_VIPS`: empty
    /// for a fresh load; for adopted maps the same, unless they were pinned
    /// by a build without them (then they are new and get filled here).
    fn sync_vip_index(&mut self) -> Result<(), DataplaneError> {
        for (key, info) in self.vip_entries()? {
            self.write_vip_entry(&key, &info)?;
            // The loop below writes every slot that changed.
            self.name_in_index(&key, info.id);
        }
        for slot in 0..VIP_INDEX_SLOTS {
            let want = self.index_value(slot);
            if self.vip_index.get(&slot, 0).ok() != Some(want) {
                self.write_index(slot)?;
            }
        }
        Ok(())
    }

    /// Records that `key` has id `id` in `index_vips` (not in the map);
    /// returns the key's index slot if that changed what it holds.
    fn name_in_index(&mut self, key: &VipKey, id: u32) -> Option<u32> {
        let slot = index_slot(key);
        let named = self.index_vips.entry(slot).or_default();
        match named.iter_mut().find(|(k, _)| k == key) {
            Some((_, have)) if *have == id => return None,
            Some((_, have)) => *have = id,
            None => named.push((*key, id)),
        }
        Some(slot)
    }

    /// What `XLB_VIP_INDEX` slot `slot` must hold (see `VIP_INDEX_SHARED`).
    fn index_value(&self, slot: u32) -> u32 {
        match self.index_vips.get(&slot).map(Vec::as_slice) {
            None | Some([]) => 0,
            Some([(_, id)]) => id + 1,
            Some(_) => VIP_INDEX_SHARED,
        }
    }

    fn write_index(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let value = self.index_value(slot);
        self.vip_index
            .set(slot, value, 0)
            .map_err(map_err(format!("writing VIP index slot {slot}")))
    }

    /// Writes the `XLB_VIP_BY_ID` entry of `info.id`: whole if it holds
    /// another key (the index does not name it for this key yet), else one
    /// changed 4-byte field per update (see `VipEntry`).
    fn write_vip_entry(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        let id = info.id;
        let err = || map_err(format!("writing the entry of VIP {id}"));
        let mut entry = self.vip_by_id.get(&id, 0).map_err(err())?;
        if entry.key != *key {
            entry = VipEntry {
                key: *key,
                info: *info,
            };
            return self.vip_by_id.set(id, entry, 0).map_err(err());
        }
        let fields: [fn(&mut VipInfo) -> &mut u32; 4] = [
            |i| &mut i.id,
            |i| &mut i.flags,
            |i| &mut i.active_ring,
            |i| &mut i._pad,
        ];
        let mut want = *info;
        for field in fields {
            if *field(&mut entry.info) != *field(&mut want) {
                *field(&mut entry.info) = *field(&mut want);
                self.vip_by_id.set(id, entry, 0).map_err(err())?;
            }
        }
        Ok(())
    }

    /// Whether the maps were adopted from a previous daemon's pins.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Removes every pin (links and maps): when this process exits, the
    /// program is detached and the maps are freed.
    pub fn unpin(&mut self) -> Result<(), DataplaneError> {
        for path in &self.links {
            remove_pin(path)?;
        }
        if let Some(dir) = &self.pin_dir {
            for name in maps::ALL.iter().chain([
                &LEGACY_FLOWS_PIN,
                &LEGACY_FLOWS_PIN_TAKEN_OVER,
                &maps::LEGACY_VIP_STATS,
            ]) {
                remove_pin(&dir.join(name))?;
            }
            // Only empty: something else may share the directory.
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    pub fn settings(&self) -> DatapathSettings {
        self.settings
    }

    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(programs::LB)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load")
    }

    /// Attaches to `interface`. `None` means native with a fallback to
    /// generic; an explicit mode is used as is. With a pin directory, a link
    /// pinned there by a previous daemon is taken over (the new program
    /// replaces the old one atomically: not a packet is missed), otherwise
    /// the new link is pinned.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: Option<XdpMode>,
    ) -> Result<Attached, DataplaneError> {
        let link_path = self
            .pin_dir
            .as_ref()
            .map(|dir| dir.join(format!("{LINK_PIN_PREFIX}{interface}")));
        if self.taken_over.contains_key(interface) {
            // Taken over already (and kept after a refused change): it
            // runs this program.
            return Ok(Attached::Replaced);
        }
        if let Some(path) = link_path.as_ref().filter(|p| p.exists()) {
            let context = || format!("taking over the pinned XDP link {}", path.display());
            let pinned = PinnedLink::from_pin(path).map_err(|source| DataplaneError::Link {
                context: context(),
                source,
            })?;
            let link =
                aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned)).map_err(|source| {
                    DataplaneError::Link {
                        context: context(),
                        source,
                    }
                })?;
            // The program takes ownership of the link; the pin keeps it
            // alive independently of this process.
            let id = self.program_mut().attach_to_link(link).map_err(|source| {
                DataplaneError::Program {
                    context: context(),
                    source,
                }
            })?;
            self.links.push(path.clone());
            self.taken_over
                .insert(interface.to_owned(), (path.clone(), id));
            return Ok(Attached::Replaced);
        }
        let program = self.program_mut();
        // (The error, and whether the interface has an XDP program already.)
        let attach = |program: &mut Xdp, m: AyaXdpMode| {
            program.attach(interface, m).map_err(|source| {
                let taken = slot_taken(&source);
                let context = if taken {
                    format!(
                        "attaching XDP to {interface} ({m:?} mode): {interface} has an XDP \
                         program already (`ip link show {interface}` shows it), another \
                         xdplb's or another tool's; detach it first (an earlier xdplb's link \
                         pinned under another interface name goes with its pin)"
                    )
                } else {
                    format!("attaching XDP to {interface} ({m:?} mode)")
                };
                (DataplaneError::Program { context, source }, taken)
            })
        };
        let (id, how) = match mode {
            Some(XdpMode::Native) => (
                attach(program, AyaXdpMode::Driver).map_err(|(e, _)| e)?,
                Attached::Native,
            ),
            Some(XdpMode::Generic) => (
                attach(program, AyaXdpMode::Skb).map_err(|(e, _)| e)?,
                Attached::Generic,
            ),
            None => match attach(program, AyaXdpMode::Driver) {
                Ok(r) => (r, Attached::Native),
                // Generic mode would find the interface taken just the same.
                Err((taken, true)) => return Err(taken),
                Err((native, false)) => {
                    tracing::warn!(
                        "native XDP refused on {interface} ({}); using generic mode",
                        causes(&native)
                    );
                    (
                        attach(program, AyaXdpMode::Skb).map_err(|(e, _)| e)?,
                        Attached::Generic,
                    )
                }
            },
        };
        if let Some(path) = link_path {
            let context = || format!("pinning the XDP link of {interface} at {}", path.display());
            let link = program
                .take_link(id)
                .map_err(|source| DataplaneError::Program {
                    context: context(),
                    source,
                })?;
            let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                context: context(),
                source,
            })?;
            // Dropping the returned handle closes our fd only: the pin holds
            // the link (and through it the program) until `unpin`.
            fd_link.pin(&path).map_err(|e| DataplaneError::Pin {
                context: context(),
                source: std::io::Error::other(e.to_string()),
            })?;
            self.links.push(path.clone());
            self.made
                .insert(interface.to_owned(), MadeLink::Pinned(path));
        } else {
            self.made.insert(interface.to_owned(), MadeLink::Owned(id));
        }
        Ok(how)
    }

    /// Detaches from `interface` the link `attach` made there in this
    /// process (removing its pin), and says whether it did: a link taken
    /// over from a pin, or none, is left alone. A pin that cannot be
    /// removed leaves the link recorded, and attached.
    pub fn detach(&mut self, interface: &str) -> Result<bool, DataplaneError> {
        if let Some(MadeLink::Pinned(path)) = self.made.get(interface) {
            // The pin held the link's last reference: removing it
            // detaches (once the kernel frees the link).
            let path = path.clone();
            remove_pin(&path)?;
            self.links.retain(|p| *p != path);
            self.made.remove(interface);
            return Ok(true);
        }
        let Some(MadeLink::Owned(id)) = self.made.remove(interface) else {
            return Ok(false);
        };
        self.drop_handle(interface, id)?;
        Ok(true)
    }

    /// Drops the program's handle on its link to `interface`.
    fn drop_handle(&mut self, interface: &str, id: XdpLinkId) -> Result<(), DataplaneError> {
        self.program_mut()
            .detach(id)
            .map_err(|source| DataplaneError::Program {
                context: format!("detaching XDP from {interface}"),
                source,
            })
    }

    /// Detaches from `interface` whatever link this daemon runs there, made
    /// or taken over, and removes its pin: an egress interface no backend
    /// is behind any more. (`detach` takes back only links this process
    /// made, for a refused change.) Says whether there was one; a pin that
    /// cannot be removed leaves the link recorded, and attached.
    pub fn release(&mut self, interface: &str) -> Result<bool, DataplaneError> {
        let Some((path, _)) = self.taken_over.get(interface) else {
            return self.detach(interface);
        };
        // The pin and the program's handle are the link's references.
        let path = path.clone();
        remove_pin(&path)?;
        self.links.retain(|p| *p != path);
        let (_, id) = self
            .taken_over
            .remove(interface)
            .expect("looked up just above");
        self.drop_handle(interface, id)?;
        Ok(true)
    }

    /// Removes the links pinned in the pin directory for interfaces this
    /// daemon did not attach to (`attach`): an earlier daemon's, for an
    /// interface the configuration no longer names (the VIP interface was
    /// changed, or no backend is behind an egress interface any more).
    /// Their program would otherwise keep running there, with these maps,
    /// and no later stop would detach it. Removing a pin detaches once the
    /// kernel frees the link. Returns the interfaces, by name, each with
    /// the outcome of removing its pin (one failing does not stop the
    /// others).
    #[allow(clippy::type_complexity, reason = "one list of named outcomes")]
    pub fn remove_stale_links(
        &mut self,
    ) -> Result<Vec<(String, Result<(), DataplaneError>)>, DataplaneError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(Vec::new());
        };
        let listing = |source| DataplaneError::Pin {
            context: format!("listing the pins in {}", dir.display()),
            source,
        };
        let mut stale = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(listing)? {
            let path = entry.map_err(listing)?.path();
            let Some(interface) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(LINK_PIN_PREFIX))
            else {
                continue;
            };
            if !self.links.contains(&path) {
                stale.push((interface.to_owned(), path));
            }
        }
        stale.sort();
        Ok(stale
            .into_iter()
            .map(|(name, path)| {
                let removed = remove_pin(&path);
                (name, removed)
            })
            .collect())
    }

    /// Adds or changes a VIP: its `XLB_VIPS` entry, then its entry by id,
    /// then the index slot that names it (so the datapath never follows
    /// the index to an entry that is not complete).
    pub fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.vips
            .insert(key, info, 0)
            .map_err(map_err(format!("writing VIP {}", info.id)))?;
        self.write_vip_entry(key, info)?;
        match self.name_in_index(key, info.id) {
            Some(slot) => self.write_index(slot),
            None => Ok(()),
        }
    }

    /// Removes a VIP: the index stops naming it first, then its `XLB_VIPS`
    /// entry goes (its entry by id stays until the id is reused).
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        let slot = index_slot(key);
        if let Some(named) = self.index_vips.get_mut(&slot) {
            let before = named.len();
            named.retain(|(k, _)| k != key);
            if named.len() != before {
                if named.is_empty() {
                    self.index_vips.remove(&slot);
                }
                self.write_index(slot)?;
            }
        }
        match self.vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("removing VIP")(e)),
        }
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(format!("writing backend {id}")))
    }

    /// Writes one of a VIP's two rings. The table must have `ring_size`
    /// slots; it is written chunk by chunk into the ring the datapath is
    /// not reading.
    pub fn write_ring(
        &mut self,
        vip_id: u32,
        ring: u32,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        let size = self.settings.ring_size;
        if table.len() != size as usize {
            return Err(DataplaneError::RingSize {
                got: table.len(),
                want: size,
            });
        }
        let chunks = ring_chunks_for(size);
        for (n, part) in table.chunks(RING_CHUNK_SLOTS as usize).enumerate() {
            let mut chunk: RingChunk = [lb_common::EMPTY_SLOT; RING_CHUNK_SLOTS as usize];
            chunk[..part.len()].copy_from_slice(part);
            let slot = n as u32 * RING_CHUNK_SLOTS;
            self.rings
                .set(ring_chunk_index(vip_id, ring, chunks, slot), chunk, 0)
                .map_err(map_err(format!("writing ring {ring} of VIP {vip_id}")))?;
        }
        Ok(())
    }

    pub fn set_tx_port(&mut self, port: u32, ifindex: u32) -> Result<(), DataplaneError> {
        self.tx_ports
            .set(port, ifindex, None, 0)
            .map_err(|source| DataplaneError::TxPort {
                port,
                ifindex,
                source,
            })
    }

    pub fn backend(&self, id: u32) -> Result<Backend, DataplaneError> {
        self.backends
            .get(&id, 0)
            .map_err(map_err(format!("reading backend {id}")))
    }

    /// Every VIP entry in the map (for adoption).
    pub fn vip_entries(&self) -> Result<Vec<(VipKey, VipInfo)>, DataplaneError> {
        self.vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("reading VIPs"))
    }

    /// Egress interface index of each tx port that is set (for adoption).
    pub fn tx_port_entries(&self) -> Vec<(u32, u32)> {
        (0..MAX_TX_PORTS)
            .filter_map(|port| self.tx_ports.get(port, 0).ok().map(|v| (port, v.if_index)))
            .collect()
    }

    pub fn set_vip_filter_word(&mut self, index: u32, word: u64) -> Result<(), DataplaneError> {
        self.vip_filter
            .set(index, word, 0)
            .map_err(map_err(format!("writing VIP filter word {index}")))
    }

    /// The datapath's clock (see `lb_common::maps::CLOCK`).
    pub fn clock(&self) -> Result<u64, DataplaneError> {
        self.clock
            .get(&0, 0)
            .map_err(map_err("reading the datapath clock"))
    }

    pub fn set_clock(&mut self, now_ns: u64) -> Result<(), DataplaneError> {
        self.clock
            .set(0, now_ns, 0)
            .map_err(map_err("writing the datapath clock"))
    }

    pub fn backend_expired(&self, id: u32) -> Result<u64, DataplaneError> {
        self.backend_expired
            .get(&id, 0)
            .map_err(map_err(format!("reading expired count of backend {id}")))
    }

    pub fn set_backend_expired(&mut self, id: u32, value: u64) -> Result<(), DataplaneError> {
        self.backend_expired
            .set(id, value, 0)
            .map_err(map_err(format!("writing expired count of backend {id}")))
    }

    /// Every flow entry (a scan of the mapped table).
    pub fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        self.flows.entries()
    }

    /// Deletes a flow entry; `true` if this call removed it.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<bool, DataplaneError> {
        Ok(self.flows.remove(key)?)
    }

    pub fn insert_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<(), DataplaneError> {
        Ok(self.flows.insert(key, value)?)
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key)
    }

    /// Every flow entry with the (bucket, way) of its slot.
    pub fn placed_flows(&self) -> Vec<((u32, u32), FlowKey, FlowValue)> {
        self.flows.placed()
    }

    /// Writes flow entries into the given empty (bucket, way) slots,
    /// whatever buckets their keys hash to (tests of slot choice); returns
    /// how many it wrote (a slot in use keeps its flow).
    pub fn place_flows(
        &mut self,
        flows: &[((u32, u32), FlowKey, FlowValue)],
    ) -> Result<usize, DataplaneError> {
        Ok(self.flows.place(flows)?)
    }

    pub fn flow_count(&self) -> usize {
        self.flows.count()
    }

    fn sum(values: &PerCpuValues<Counters>) -> Counters {
        values.iter().fold(Counters::default(), |mut acc, c| {
            acc.add(c);
            acc
        })
    }

    /// What the former backends of VIP `id` counted (`maps::VIP_RETIRED`).
    pub fn vip_retired(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.vip_retired
            .get(&id, 0)
            .map_err(map_err(format!("reading VIP {id} retired counters")))
    }

    /// Adds a backend's counters to what VIP `id`'s former backends
    /// counted, as it leaves the VIP.
    pub fn add_vip_retired(&mut self, id: u32, counters: &Counters) -> Result<(), DataplaneError> {
        let mut retired = self.vip_retired(id)?;
        retired.add(counters);
        self.set_vip_retired(id, &retired)
    }

    fn set_vip_retired(&mut self, id: u32, counters: &Counters) -> Result<(), DataplaneError> {
        self.vip_retired
            .set(id, counters, 0)
            .map_err(map_err(format!("writing VIP {id} retired counters")))
    }

    /// Turns an older daemon's per-CPU VIP counters (`maps::LEGACY_VIP_STATS`
    /// at `path`, where its datapath counted every packet on the VIP as well
    /// as on the backend) into `maps::VIP_RETIRED`, for every VIP id (over
    /// what a start before may have written: a start that fails before
    /// `finish_migration` removes the pin leaves it to the next one, and
    /// the older build, if it comes back meanwhile, counts on in it).
    /// What a VIP counted less what its backends hold is what its former
    /// backends counted. Each packet of the older program adds the same to
    /// both, and this load's program, which counts on backends only, is
    /// not attached yet: read in that order, the difference misses at most
    /// the packets counted between the two reads, and never counts one
    /// twice.
    fn convert_vip_stats(&mut self, path: &Path) -> Result<(), DataplaneError> {
        let map = MapData::from_pin(path).map_err(|source| opening_error(path, source))?;
        let legacy: PerCpuArray<MapData, Counters> = aya::maps::Map::PerCpuArray(map)
            .try_into()
            .map_err(map_err(format!("opening {}", path.display())))?;
        let vips = self.settings.max_vips;
        let mut backends_of = vec![Vec::new(); vips as usize];
        for id in 0..MAX_BACKENDS {
            let entry = self.backend(id)?;
            if entry.generation != 0 && entry.vip_id < vips {
                backends_of[entry.vip_id as usize].push(id);
            }
        }
        let mut with_former = 0;
        for (id, backends) in (0..vips).zip(&backends_of) {
            let counted = legacy
                .get(&id, 0)
                .map(|v| Self::sum(&v))
                .map_err(map_err(format!(
                    "reading VIP {id} counters at {}",
                    path.display()
                )))?;
            let mut on_backends = Counters::default();
            for &b in backends {
                on_backends.add(&self.backend_counters(b)?);
            }
            let retired = counted.saturating_sub(&on_backends);
            with_former += usize::from(retired != Counters::default());
            self.set_vip_retired(id, &retired)?;
        }
        tracing::info!(
            "converted the per-VIP counters at {} ({with_former} VIP ids with counts beyond \
             their backends'); the pin goes once every link runs this program",
            path.display()
        );
        Ok(())
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.backend_stats
            .get(&id, 0)
            .map(|v| Self::sum(&v))
            .map_err(map_err(format!("reading backend {id} counters")))
    }

    /// Zeroes a VIP's or backend's counters before its id is reused (the
    /// backend's expired-flow count included).
    pub fn reset_counters(
        &mut self,
        vip_id: Option<u32>,
        backend_id: Option<u32>,
    ) -> Result<(), DataplaneError> {
        if let Some(id) = vip_id {
            self.set_vip_retired(id, &Counters::default())?;
        }
        if let Some(id) = backend_id {
            let cpus = aya::util::nr_cpus()
                .map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))?;
            let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus])
                .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
            self.backend_stats
                .set(id, zeros, 0)
                .map_err(map_err(format!("zeroing backend {id} counters")))?;
            self.set_backend_expired(id, 0)?;
        }
        Ok(())
    }

    /// Packets counted per pass/drop reason, in `Reason::ALL` order.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Reason::ALL
            .iter()
            .map(|&r| {
                self.reason_stats
                    .get(&(r as u32), 0)
                    .map(|v| (r, v.iter().sum()))
                    .map_err(map_err("reading reason counters"))
            })
            .collect()
    }
}

/// Pins at `path` per-CPU VIP counters made the way an older build made
/// them (`maps::LEGACY_VIP_STATS`: a per-CPU array of `max_vips`
/// `Counters`), each of `counters` spread over the CPUs: for tests of
/// their conversion, never used by the daemon.
#[doc(hidden)]
pub fn pin_legacy_vip_stats(
    path: &Path,
    max_vips: u32,
    counters: &[(u32, Counters)],
) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let value_size = size_of::<Counters>();
    // BPF_MAP_CREATE (0): map_type PERCPU_ARRAY (6), key 4, value size,
    // max entries; the rest of the attribute 0.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[6, 4, value_size as u32, max_vips]);
    // SAFETY: a zero-padded bpf_attr of 128 bytes.
    let fd = unsafe { crate::flows::bpf_fd(0, attr.as_ptr().cast()) }?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for &(id, c) in counters {
        // One value per possible CPU (each 8-byte aligned): CPU 0's first.
        // The counts spread over every CPU (the rest of each division on
        // CPU 0), as packets on several CPUs leave them: a conversion that
        // read one CPU's would be short.
        let n = cpus as u64;
        let share = |v: u64, cpu: usize| v / n + if cpu == 0 { v % n } else { 0 };
        let values: Vec<Counters> = (0..cpus)
            .map(|cpu| Counters {
                packets: share(c.packets, cpu),
                bytes: share(c.bytes, cpu),
                new_flows: share(c.new_flows, cpu),
                closed_flows: share(c.closed_flows, cpu),
            })
            .collect();
        // BPF_MAP_UPDATE_ELEM (2): map_fd, key, value, flags 0.
        let mut update = [0u64; 16];
        update[0] = fd.as_raw_fd() as u64;
        update[1] = &raw const id as u64;
        update[2] = values.as_ptr() as u64;
        // SAFETY: a zero-padded bpf_attr of 128 bytes pointing at live
        // buffers: the key, and a value for each possible CPU.
        unsafe { crate::flows::bpf(2, update.as_ptr().cast()) }?;
    }
    crate::flows::bpf_pin(fd.as_fd(), path)
}

fn opening_error(path: &Path, source: MapError) -> DataplaneError {
    DataplaneError::Map {
        context: format!("opening pinned map {}", path.display()),
        source,
    }
}

/// (key size, value size, max entries) of the map pinned at `path`.
fn pinned_layout(path: &Path) -> Result<(u32, u32, u32), DataplaneError> {
    let info = MapInfo::from_pin(path).map_err(|source| opening_error(path, source))?;
    Ok((info.key_size(), info.value_size(), info.max_entries()))
}

fn check_pinned(
    path: &Path,
    dir: &Path,
    (key, value, max): (u32, u32, u32),
) -> Result<(), DataplaneError> {
    let (got_key, got_value, got_max) = pinned_layout(path)?;
    for (what, got, want) in [
        ("key size", got_key, key),
        ("value size", got_value, value),
        ("max entries", got_max, max),
    ] {
        if got != want {
            return Err(DataplaneError::PinnedMismatch {
                path: path.display().to_string(),
                dir: dir.display().to_string(),
                what,
                got,
                want,
            });
        }
    }
    Ok(())
}

/// What `finish_migration` did after `load` copied the older table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migration {
    /// Flows the older program made after the first copy, copied now.
    pub late: usize,
    /// Flows that found both their buckets full (the new program had
    /// filled them meanwhile): their next packet is scheduled anew.
    pub dropped: usize,
}

/// The pin of the XDP link on an interface is this prefix and its name.
pub const LINK_PIN_PREFIX: &str = "link-";

/// Where a migrating load moves the older flow table's pin (bpffs names
/// take no dots).
pub const LEGACY_FLOWS_PIN: &str = "XLB_FLOWS_72_BYTE_SLOTS";
/// The same once this program has taken the VIP interface's link over.
pub const LEGACY_FLOWS_PIN_TAKEN_OVER: &str = "XLB_FLOWS_72_BYTE_SLOTS_TAKEN_OVER";

/// How far a migration had gone when a load found the older table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// At `XLB_FLOWS`: this load starts the migration.
    Fresh,
    /// At `LEGACY_FLOWS_PIN`: a start copied it and stopped before its
    /// takeover (or after it, before recording it); the older program may
    /// still run on the VIP interface. A load that finds no loaded program
    /// using the older table takes it for `TakenOver`
    /// (`older_program_may_run`).
    Copied,
    /// At `LEGACY_FLOWS_PIN_TAKEN_OVER`: a start took the links over and
    /// stopped before it finished.
    TakenOver,
}

/// A pinned flow table of the older layout, moved aside during a load.
struct Legacy {
    table: LegacyTable,
    /// Where its pin was (`XLB_FLOWS`), and where it is now.
    moved_from: PathBuf,
    pin: PathBuf,
    stage: Stage,
}

impl Legacy {
    /// Records that the older program no longer runs: stage `TakenOver`,
    /// the pin renamed `LEGACY_FLOWS_PIN_TAKEN_OVER` for a later start.
    /// The stage holds even if the rename fails: this start copies only
    /// what the new table lacks either way.
    fn take_over(&mut self) -> Result<(), DataplaneError> {
        self.stage = Stage::TakenOver;
        let taken = self.moved_from.with_file_name(LEGACY_FLOWS_PIN_TAKEN_OVER);
        rename_pin(&self.pin, &taken)?;
        self.pin = taken;
        Ok(())
    }
}

/// The older flow table in `dir`, if there is one with this
/// configuration's bucket count: at one of the moved names (a migration to
/// go on with), else at `XLB_FLOWS` (one to start). Anything else is left
/// to `check_pinned`.
fn open_legacy_flows(dir: &Path, buckets: u32) -> Result<Option<Legacy>, DataplaneError> {
    let moved_from = dir.join(maps::FLOWS);
    for (name, stage) in [
        (LEGACY_FLOWS_PIN_TAKEN_OVER, Stage::TakenOver),
        (LEGACY_FLOWS_PIN, Stage::Copied),
        (maps::FLOWS, Stage::Fresh),
    ] {
        let path = &dir.join(name);
        if !path.exists() {
            continue;
        }
        if pinned_layout(path)? != (4, LEGACY_BUCKET_BYTES, buckets) {
            continue;
        }
        let map = MapData::from_pin(path).map_err(|source| opening_error(path, source))?;
        let mut legacy = Legacy {
            table: LegacyTable::new(map, buckets)?,
            moved_from: moved_from.clone(),
            pin: if stage == Stage::Fresh {
                dir.join(LEGACY_FLOWS_PIN)
            } else {
                path.clone()
            },
            stage,
        };
        if stage == Stage::Copied && !older_program_may_run(&legacy.table) {
            // The start before took the VIP interface's link over and died
            // before it renamed the pin, or the older program's links are
            // gone: nothing writes the older table, so the new one's
            // entries win. Recorded for the next start too.
            if let Err(e) = legacy.take_over() {
                tracing::warn!("recording that no program uses the older flow table: {e}");
            }
        }
        return Ok(Some(legacy));
    }
    Ok(None)
}

/// Whether a loaded BPF program uses the older flow table `table` (lists
/// its map), so that it may still write it: the kernel's answer to
/// whether the older program still runs anywhere, whatever the pins say.
/// True if the kernel's list cannot be read (the cautious answer: the
/// older table is synced into the new one before the takeover).
fn older_program_may_run(table: &LegacyTable) -> bool {
    let id = match table.map_id() {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!("reading the older flow table's map id: {e}");
            return true;
        }
    };
    for program in aya::programs::loaded_programs() {
        let program = match program {
            Ok(program) => program,
            // Unloaded since the kernel listed its id: it no longer uses
            // anything.
            Err(aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                io_error,
                ..
            })) if io_error.raw_os_error() == Some(libc::ENOENT) => continue,
            // The list cannot be read (no privilege, for one).
            Err(_) => return true,
        };
        match program.map_ids() {
            Ok(Some(ids)) if ids.contains(&id) => return true,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return true,
        }
    }
    false
}

fn rename_pin(from: &Path, to: &Path) -> Result<(), DataplaneError> {
    std::fs::rename(from, to).map_err(|source| DataplaneError::Pin {
        context: format!("moving pin {} to {}", from.display(), to.display()),
        source,
    })
}

/// `e` and its causes, outermost first.
fn chain<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'e (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |c| c.source())
}

/// Whether an attach failed because the interface has an XDP program
/// already (the kernel answers EEXIST or EBUSY).
fn slot_taken(e: &ProgramError) -> bool {
    chain(e)
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::ResourceBusy
            )
        })
}

/// An error with its causes, as one line.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    chain(e)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Pin {
            context: format!("removing pin {}", path.display()),
            source,
        }),
    }
}

/// The `XLB_VIP_INDEX` slot of a VIP.
fn index_slot(key: &VipKey) -> u32 {
    vip_index_slot(key.filter_slot())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_create_failed(errno: i32) -> ProgramError {
        ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn an_interface_with_an_xdp_program_is_told_from_one_without_support() {
        // Native mode taken (EBUSY), generic mode taken (EEXIST): the
        // slot; a driver without native XDP (EOPNOTSUPP): not.
        assert!(slot_taken(&link_create_failed(libc::EBUSY)));
        assert!(slot_taken(&link_create_failed(libc::EEXIST)));
        assert!(!slot_taken(&link_create_failed(libc::EOPNOTSUPP)));
        assert!(!slot_taken(&ProgramError::NotLoaded));
    }

    #[test]
    fn causes_puts_an_error_and_its_sources_on_one_line() {
        let e = DataplaneError::Program {
            context: "attaching XDP to br0 (Driver mode)".into(),
            source: link_create_failed(libc::EOPNOTSUPP),
        };
        assert_eq!(
            causes(&e),
            format!(
                "attaching XDP to br0 (Driver mode): `bpf_link_create` failed: {}",
                std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)
            )
        );
    }
}
