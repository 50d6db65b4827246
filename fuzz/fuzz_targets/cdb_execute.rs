//! Any CDB with any Data-Out, on any LUN, gets a response and never panics the SCSI core.
#![no_main]
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use scsi::testing::MemDevice;
use scsi::{ItNexus, LuConfig, ScsiRequest, TargetDevice, TargetPort, TaskAttribute};

fn device() -> &'static TargetDevice {
    static D: OnceLock<TargetDevice> = OnceLock::new();
    D.get_or_init(|| {
        let d = TargetDevice::new();
        // Unthrottled sanitize: a fuzzed SANITIZE must not slow every later input.
        let base = LuConfig { sanitize_bytes_per_s: 0, ..Default::default() };
        d.add_lun(0, base.clone(), Arc::new(MemDevice::new(1 << 20))).unwrap();
        d.add_lun(1, LuConfig { block_size: 4096, read_only: true, ..base }, Arc::new(MemDevice::new(1 << 20)))
            .unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (head, rest) = data.split_at(2);
    let cdb_len = (head[0] as usize % 17).min(rest.len());
    let (cdb, data_out) = rest.split_at(cdb_len);
    let nexus = ItNexus {
        initiator_name: "iqn.fuzz".into(),
        isid: [head[1] & 3, 0, 0, 0, 0, 0],
        target_port: TargetPort { name: "iqn.t,t,0x0001".into(), relative_id: 1, group: 1 },
    };
    let data_out = bytes::Bytes::copy_from_slice(data_out);
    let req = ScsiRequest {
        nexus: &nexus,
        lun: u64::from(head[1] >> 6),
        cdb,
        data_out: &data_out,
        expected_data_in_len: 65536,
        attr: TaskAttribute::Simple,
        arrived: std::time::Instant::now(),
    };
    let _ = device().execute(&req);
});
