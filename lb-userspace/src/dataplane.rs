//! The loaded XDP program and typed handles to its maps.
//!
//! This is the only module that talks to aya. It knows map layouts, not
//! policy: which ids to use and in what order to write is `state`'s job.

use aya::{
    maps::{Array, DevMap, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, Xdp, XdpMode as AyaXdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    globals, maps, programs, ring_chunk_index, ring_chunks_for, Backend, Counters, FlowKey,
    FlowValue, Reason, RingChunk, VipInfo, VipKey, RING_CHUNK_SLOTS,
};

use crate::config::{DatapathSettings, XdpMode};

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
}

pub struct Dataplane {
    ebpf: Ebpf,
    settings: DatapathSettings,
    vips: HashMap<MapData, VipKey, VipInfo>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, RingChunk>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    tx_ports: DevMap<MapData>,
    vip_stats: PerCpuArray<MapData, Counters>,
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
    pub fn load(settings: DatapathSettings) -> Result<Self, DataplaneError> {
        let chunks = ring_chunks_for(settings.ring_size);
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::RING_SIZE, &settings.ring_size, true)
            .override_global(globals::RING_CHUNKS, &chunks, true)
            .map_max_entries(maps::VIPS, settings.max_vips)
            .map_max_entries(maps::VIP_STATS, settings.max_vips)
            .map_max_entries(maps::RINGS, settings.max_vips * 2 * chunks)
            .map_max_entries(maps::FLOWS, settings.flow_table_size)
            .load(OBJECT)?;
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
        Ok(Self {
            settings,
            vips: take_map!(ebpf, maps::VIPS),
            backends: take_map!(ebpf, maps::BACKENDS),
            rings: take_map!(ebpf, maps::RINGS),
            flows: take_map!(ebpf, maps::FLOWS),
            tx_ports: take_map!(ebpf, maps::TX_PORTS),
            vip_stats: take_map!(ebpf, maps::VIP_STATS),
            backend_stats: take_map!(ebpf, maps::BACKEND_STATS),
            reason_stats: take_map!(ebpf, maps::REASON_STATS),
            ebpf,
        })
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
    /// generic; an explicit mode is used as is.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: Option<XdpMode>,
    ) -> Result<Attached, DataplaneError> {
        let program = self.program_mut();
        let attach = |program: &mut Xdp, m: AyaXdpMode| {
            program
                .attach(interface, m)
                .map_err(|source| DataplaneError::Program {
                    context: format!("attaching XDP to {interface} ({m:?} mode)"),
                    source,
                })
        };
        match mode {
            Some(XdpMode::Native) => attach(program, AyaXdpMode::Driver).map(|_| Attached::Native),
            Some(XdpMode::Generic) => attach(program, AyaXdpMode::Skb).map(|_| Attached::Generic),
            None => match attach(program, AyaXdpMode::Driver) {
                Ok(_) => Ok(Attached::Native),
                Err(native) => {
                    tracing::warn!(
                        "native XDP refused on {interface} ({native}); using generic mode"
                    );
                    attach(program, AyaXdpMode::Skb).map(|_| Attached::Generic)
                }
            },
        }
    }

    pub fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.vips
            .insert(key, info, 0)
            .map_err(map_err(format!("writing VIP {}", info.id)))
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
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

    pub fn insert_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<(), DataplaneError> {
        self.flows
            .insert(key, value, 0)
            .map_err(map_err("inserting flow"))
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key, 0).ok()
    }

    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(Result::is_ok).count()
    }

    fn sum(values: &PerCpuValues<Counters>) -> Counters {
        values.iter().fold(Counters::default(), |mut acc, c| {
            acc.add(c);
            acc
        })
    }

    pub fn vip_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.vip_stats
            .get(&id, 0)
            .map(|v| Self::sum(&v))
            .map_err(map_err(format!("reading VIP {id} counters")))
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.backend_stats
            .get(&id, 0)
            .map(|v| Self::sum(&v))
            .map_err(map_err(format!("reading backend {id} counters")))
    }

    /// Zeroes a VIP's or backend's counters before its id is reused.
    pub fn reset_counters(
        &mut self,
        vip_id: Option<u32>,
        backend_id: Option<u32>,
    ) -> Result<(), DataplaneError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::Cpus(format!("{what}: {e}")))?;
        let zeros = || {
            PerCpuValues::try_from(vec![Counters::default(); cpus])
                .map_err(|e| DataplaneError::Cpus(e.to_string()))
        };
        if let Some(id) = vip_id {
            self.vip_stats
                .set(id, zeros()?, 0)
                .map_err(map_err(format!("zeroing VIP {id} counters")))?;
        }
        if let Some(id) = backend_id {
            self.backend_stats
                .set(id, zeros()?, 0)
                .map_err(map_err(format!("zeroing backend {id} counters")))?;
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
