//! Command-level tests over an in-memory device.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;

use crate::testing::MemDevice;
use crate::*;

const BLOCKS: u64 = 2048;

fn nexus(name: &str) -> ItNexus {
    ItNexus {
        initiator_name: name.into(),
        isid: [0x80, 0, 0, 0, 0, 1],
        target_port: TargetPort {
            name: "iqn.2024-01.test:t,t,0x0001".into(),
            relative_id: 1,
            group: 1,
        },
    }
}

struct Kit {
    target: TargetDevice,
    dev: Arc<MemDevice>,
}

impl Kit {
    fn new() -> Kit {
        Kit::with(LuConfig::default(), MemDevice::new(BLOCKS * 512))
    }

    fn with(config: LuConfig, dev: MemDevice) -> Kit {
        let dev = Arc::new(dev);
        let target = TargetDevice::new();
        target.add_lun(0, config, dev.clone()).unwrap();
        Kit { target, dev }
    }

    fn exec(&self, n: &ItNexus, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        self.exec_lun(n, 0, cdb, data)
    }

    fn exec_lun(&self, n: &ItNexus, lun: u64, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let data = Bytes::copy_from_slice(data);
        let req = ScsiRequest {
            nexus: n,
            lun,
            cdb: &c,
            data_out: &data,
            expected_data_in_len: 1 << 20,
            attr: TaskAttribute::Simple,
            arrived: std::time::Instant::now(),
        };
        self.target.execute(&req)
    }

    /// A nexus whose power-on unit attention has been consumed.
    fn ready(&self, name: &str) -> ItNexus {
        let n = nexus(name);
        let r = self.exec(&n, &[0x00, 0, 0, 0, 0, 0], &[]);
        assert_eq!(sense_of(&r), (0x06, 0x29, 0x00));
        assert_good(&self.exec(&n, &[0x00, 0, 0, 0, 0, 0], &[]));
        n
    }
}

fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
    assert_eq!(r.status, ScsiStatus::CheckCondition, "{r:?}");
    let s = r.sense.as_ref().unwrap();
    if s[0] & 0x7F == 0x72 {
        (s[1] & 0x0F, s[2], s[3])
    } else {
        (s[2] & 0x0F, s[12], s[13])
    }
}

fn fixed_information(r: &ScsiResponse) -> u32 {
    let s = r.sense.as_ref().unwrap();
    assert_eq!(s[0], 0xF0, "VALID fixed format");
    u32::from_be_bytes(s[3..7].try_into().unwrap())
}

fn assert_good(r: &ScsiResponse) {
    assert_eq!(r.status, ScsiStatus::Good, "{r:?}");
}

fn read16(lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![0x88, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn write16(lba: u64, n: u32, flags: u8) -> Vec<u8> {
    let mut c = read16(lba, n);
    c[0] = 0x8A;
    c[1] = flags;
    c
}

fn write10(lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![0x2A, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}

fn read10(lba: u32, n: u16) -> Vec<u8> {
    let mut c = write10(lba, n);
    c[0] = 0x28;
    c
}

const ILLEGAL: u8 = 0x05;

#[test]
fn power_on_unit_attention_is_reported_once_and_not_by_inquiry() {
    let k = Kit::new();
    let n = nexus("i1");
    assert_good(&k.exec(&n, &[0x12, 0, 0, 0, 96, 0], &[]));
    assert_good(&k.exec(&n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]));
    assert_eq!(sense_of(&k.exec(&n, &[0x00; 6], &[])), (0x06, 0x29, 0x00));
    assert_good(&k.exec(&n, &[0x00; 6], &[]));
}

#[test]
fn request_sense_returns_and_clears_unit_attention() {
    let k = Kit::new();
    let n = nexus("i1");
    let r = k.exec(&n, &[0x03, 0, 0, 0, 252, 0], &[]);
    assert_good(&r);
    assert_eq!(
        (r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x06, 0x29, 0x00)
    );
    let r = k.exec(&n, &[0x03, 0, 0, 0, 252, 0], &[]);
    assert_eq!((r.data_in[2], r.data_in[12]), (0x00, 0x00));
    assert_good(&k.exec(&n, &[0x00; 6], &[]));
}

#[test]
fn standard_inquiry_contents() {
    let k = Kit::new();
    let n = nexus("i1");
    let r = k.exec(&n, &[0x12, 0, 0, 1, 0, 0], &[]);
    assert_good(&r);
    let d = &r.data_in;
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0x00);
    assert_eq!(d[2], 0x06);
    assert_eq!(d[3] & 0x0F, 2);
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(
        (d[5] >> 4) & 0x03,
        0x01,
        "TPGS implicit (explicit only with port groups)"
    );
    assert_eq!(&d[8..16], b"BULWARK ");
    let descriptors: Vec<u16> = (0..8)
        .map(|i| u16::from_be_bytes([d[58 + 2 * i], d[59 + 2 * i]]))
        .collect();
    for v in [0x00A0, 0x0960, 0x0460, 0x04C0] {
        assert!(descriptors.contains(&v), "{v:#x}");
    }
    // Allocation length cuts the data.
    assert_eq!(k.exec(&n, &[0x12, 0, 0, 0, 5, 0], &[]).data_in.len(), 5);
    // A page code without EVPD is invalid.
    assert_eq!(
        sense_of(&k.exec(&n, &[0x12, 0, 1, 0, 255, 0], &[])),
        (ILLEGAL, 0x24, 0)
    );
}

#[test]
fn vpd_pages() {
    let k = Kit::new();
    let n = nexus("i1");
    let r = k.exec(&n, &[0x12, 1, 0x00, 0, 255, 0], &[]);
    assert_good(&r);
    let pages = r.data_in[4..].to_vec();
    assert_eq!(pages, vec![0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    for p in pages {
        let r = k.exec(&n, &[0x12, 1, p, 0, 255, 0], &[]);
        assert_good(&r);
        assert_eq!(r.data_in[1], p);
        assert_eq!(
            u16::from_be_bytes([r.data_in[2], r.data_in[3]]) as usize,
            r.data_in.len() - 4
        );
    }
    let r = k.exec(&n, &[0x12, 1, 0x83, 0, 255, 0], &[]);
    // First designator: NAA, binary, LU association.
    assert_eq!(&r.data_in[4..8], &[0x01, 0x03, 0x00, 16]);
    let r = k.exec(&n, &[0x12, 1, 0xB0, 0, 255, 0], &[]);
    assert_eq!(r.data_in[3], 0x3C);
    let r = k.exec(&n, &[0x12, 1, 0xB2, 0, 255, 0], &[]);
    assert_eq!(r.data_in[5] & 0xE4, 0xE4, "LBPU LBPWS LBPWS10 LBPRZ");
    assert_eq!(r.data_in[6] & 0x07, 0x02, "thin");
    assert_eq!(
        sense_of(&k.exec(&n, &[0x12, 1, 0x42, 0, 255, 0], &[])),
        (ILLEGAL, 0x24, 0)
    );
}

#[test]
fn missing_lun_behaviour() {
    let k = Kit::new();
    let n = nexus("i1");
    let r = k.exec_lun(&n, 5, &[0x12, 0, 0, 0, 96, 0], &[]);
    assert_good(&r);
    assert_eq!(r.data_in[0], 0x7F);
    let r = k.exec_lun(&n, 5, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(&r.data_in[..4], &[0, 0, 0, 8]);
    let r = k.exec_lun(&n, 5, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_good(&r);
    assert_eq!((r.data_in[2], r.data_in[12]), (ILLEGAL, 0x25));
    assert_eq!(
        sense_of(&k.exec_lun(&n, 5, &[0x00; 6], &[])),
        (ILLEGAL, 0x25, 0)
    );
}

#[test]
fn report_luns_lists_and_lun_changes_raise_unit_attention() {
    let k = Kit::new();
    let n = k.ready("i1");
    k.target
        .add_lun(300, LuConfig::default(), Arc::new(MemDevice::new(1 << 20)))
        .unwrap();
    assert_eq!(sense_of(&k.exec(&n, &[0x00; 6], &[])), (0x06, 0x3F, 0x0E));
    let r = k.exec(&n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(&r.data_in[..4], &[0, 0, 0, 16]);
    assert_eq!(&r.data_in[16..18], &[0x41, 0x2C]);
    assert_eq!(
        sense_of(&k.exec(&n, &[0xA0, 0, 7, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[])).1,
        0x24
    );
    assert!(matches!(
        k.target.add_lun(0, LuConfig::default(), k.dev.clone()),
        Err(ScsiError::LunExists(0))
    ));
    let bad = LuConfig {
        block_size: 1000,
        ..LuConfig::default()
    };
    assert!(matches!(
        k.target.add_lun(1, bad, k.dev.clone()),
        Err(ScsiError::BadBlockSize(1000))
    ));
    k.target.remove_lun(300).unwrap();
    assert_eq!(k.target.luns(), vec![0]);
}

#[test]
fn a_replaced_lun_is_never_missing_and_raises_no_inventory_change() {
    let k = Kit::new();
    k.target
        .add_lun(1, LuConfig::default(), Arc::new(MemDevice::new(1 << 20)))
        .unwrap();
    let n = k.ready("i1");
    // Clear the unit attentions of the add on both LUNs.
    let _ = k.exec(&n, &[0x00; 6], &[]);
    let _ = k.exec_lun(&n, 1, &[0x00; 6], &[]);
    assert_good(&k.exec_lun(&n, 1, &[0x00; 6], &[]));
    let next = Arc::new(MemDevice::new(BLOCKS * 512));
    next.write_at(0, &[0xAB; 512], false).unwrap();
    k.target
        .replace_shared_lun(0, LuConfig::default(), next, None)
        .unwrap();
    assert_eq!(k.target.luns(), vec![0, 1]);
    // The other LUN saw no REPORTED LUNS DATA HAS CHANGED: the inventory is the same.
    assert_good(&k.exec_lun(&n, 1, &[0x00; 6], &[]));
    // LUN 0 is the new device.
    let mut r = k.exec(&n, &read16(0, 1), &[]);
    if r.status != ScsiStatus::Good {
        r = k.exec(&n, &read16(0, 1), &[]);
    }
    assert_good(&r);
    assert_eq!(&r.data_in[..512], &[0xAB; 512][..]);
    // Replacing a LUN that is not there adds it.
    k.target
        .replace_shared_lun(
            2,
            LuConfig::default(),
            Arc::new(MemDevice::new(1 << 20)),
            None,
        )
        .unwrap();
    assert_eq!(k.target.luns(), vec![0, 1, 2]);
}

#[test]
fn read_write_round_trip_all_sizes() {
    let k = Kit::new();
    let n = k.ready("i1");
    let data: Vec<u8> = (0..4 * 512).map(|i| (i % 251) as u8).collect();
    assert_good(&k.exec(&n, &write16(10, 4, 0), &data));
    let r = k.exec(&n, &read16(10, 4), &[]);
    assert_good(&r);
    assert_eq!(&r.data_in[..], &data[..]);
    assert_eq!(&k.exec(&n, &read10(10, 4), &[]).data_in[..], &data[..]);
    let r = k.exec(&n, &[0xA8, 0, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0], &[]);
    assert_eq!(&r.data_in[..], &data[..]);
    let r = k.exec(&n, &[0x08, 0, 0, 10, 4, 0], &[]);
    assert_eq!(&r.data_in[..], &data[..]);
    // WRITE(6) with a zero length means 256 blocks.
    let big = vec![0x5Au8; 256 * 512];
    assert_good(&k.exec(&n, &[0x0A, 0, 0, 0, 0, 0], &big));
    assert_eq!(k.dev.snapshot(255 * 512, 512), vec![0x5A; 512]);
}

#[test]
fn lba_range_and_field_checks() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_eq!(
        sense_of(&k.exec(&n, &read16(BLOCKS, 1), &[])),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        sense_of(&k.exec(&n, &read16(BLOCKS - 1, 2), &[])),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        sense_of(&k.exec(&n, &read16(u64::MAX, 1), &[])),
        (ILLEGAL, 0x21, 0)
    );
    assert_eq!(
        sense_of(&k.exec(&n, &read10(BLOCKS as u32 + 1, 0), &[])),
        (ILLEGAL, 0x21, 0)
    );
    assert_good(&k.exec(&n, &read10(0, 0), &[]));
    // RDPROTECT without protection information.
    let mut c = read10(0, 1);
    c[1] = 0x20;
    assert_eq!(sense_of(&k.exec(&n, &c, &[])), (ILLEGAL, 0x24, 0));
    // More than the maximum transfer length.
    assert_eq!(
        sense_of(&k.exec(&n, &read16(0, 1 << 20), &[])),
        (ILLEGAL, 0x24, 0)
    );
    // Unknown operation code.
    assert_eq!(
        sense_of(&k.exec(&n, &[0xC0, 0, 0, 0, 0, 0], &[])),
        (ILLEGAL, 0x20, 0)
    );
}

#[test]
fn fua_and_write_cache() {
    let k = Kit::new();
    let n = k.ready("i1");
    let data = vec![1u8; 512];
    assert_good(&k.exec(&n, &write16(0, 1, 0), &data));
    assert_eq!(k.dev.fua_writes.load(Ordering::Relaxed), 0);
    assert_good(&k.exec(&n, &write16(0, 1, 0x08), &data));
    assert_eq!(k.dev.fua_writes.load(Ordering::Relaxed), 1);
    // WCE = 0: every write is forced unit access.
    let k = Kit::with(
        LuConfig {
            write_cache: false,
            ..LuConfig::default()
        },
        MemDevice::new(BLOCKS * 512),
    );
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write16(0, 1, 0), &data));
    assert_eq!(k.dev.fua_writes.load(Ordering::Relaxed), 1);
    assert_good(&k.exec(&n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    assert_eq!(k.dev.flushes.load(Ordering::Relaxed), 1);
}

#[test]
fn short_data_out_writes_whole_blocks_that_arrived() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(0, 2), &[7u8; 512]));
    assert_eq!(k.dev.snapshot(0, 512), vec![7; 512]);
    assert_eq!(k.dev.snapshot(512, 512), vec![0; 512]);
    assert_eq!(
        sense_of(&k.exec(&n, &write10(0, 1), &[7u8; 200])),
        (ILLEGAL, 0x0E, 0x03)
    );
    assert_eq!(k.target.data_out_len(0, &write10(0, 2)), Some(1024));
    assert_eq!(k.target.data_out_len(9, &write10(0, 2)), None);
}

#[test]
fn device_errors_become_medium_errors() {
    let k = Kit::new();
    let n = k.ready("i1");
    k.dev.fail_reads.store(true, Ordering::Relaxed);
    assert_eq!(sense_of(&k.exec(&n, &read16(0, 1), &[])), (0x03, 0x11, 0));
    k.dev.fail_writes.store(true, Ordering::Relaxed);
    assert_eq!(
        sense_of(&k.exec(&n, &write16(0, 1, 0), &[0; 512])),
        (0x03, 0x0C, 0)
    );
}

#[test]
fn read_only_and_software_write_protect() {
    let k = Kit::with(
        LuConfig {
            read_only: true,
            ..LuConfig::default()
        },
        MemDevice::new(BLOCKS * 512),
    );
    let n = k.ready("i1");
    assert_eq!(
        sense_of(&k.exec(&n, &write16(0, 1, 0), &[0; 512])),
        (0x07, 0x27, 0)
    );
    let r = k.exec(&n, &[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    assert_eq!(r.data_in[2] & 0x80, 0x80, "WP");
}

#[test]
fn read_capacity() {
    let k = Kit::new();
    let n = k.ready("i1");
    let r = k.exec(&n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(&r.data_in[..], &[0, 0, 0x07, 0xFF, 0, 0, 2, 0]);
    let r = k.exec(
        &n,
        &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
    );
    assert_eq!(&r.data_in[..8], &(BLOCKS - 1).to_be_bytes());
    assert_eq!(r.data_in[14] & 0xC0, 0xC0, "LBPME LBPRZ");
    let r = k.exec(
        &n,
        &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0],
        &[],
    );
    assert_eq!(r.data_in.len(), 5);
    k.dev.resize(2 * BLOCKS * 512);
    k.target.capacity_changed(0);
    assert_eq!(sense_of(&k.exec(&n, &[0x00; 6], &[])), (0x06, 0x2A, 0x09));
}

#[test]
fn low_space_under_a_thin_unit_is_a_soft_threshold_unit_attention() {
    let k = Kit::new();
    let a = k.ready("a");
    let b = k.ready("b");
    assert!(k.target.thin_threshold_reached(0));
    for n in [&a, &b] {
        assert_eq!(sense_of(&k.exec(n, &[0x00; 6], &[])), (0x06, 0x38, 0x07));
        assert_good(&k.exec(n, &[0x00; 6], &[]));
    }
    assert!(!k.target.thin_threshold_reached(7), "no such unit");
    let thick = Kit::with(LuConfig::default(), MemDevice::thick(BLOCKS * 512));
    let c = thick.ready("c");
    assert!(
        !thick.target.thin_threshold_reached(0),
        "a fully provisioned unit"
    );
    assert_good(&thick.exec(&c, &[0x00; 6], &[]));
}

#[test]
fn mode_select_changes_d_sense_and_notifies_other_nexuses() {
    let k = Kit::new();
    let a = k.ready("a");
    let b = k.ready("b");
    let r = k.exec(&a, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]);
    assert_good(&r);
    let mut page = r.data_in[4..].to_vec();
    assert_eq!(&page[..2], &[0x0A, 0x0A]);
    page[2] |= 0x04; // D_SENSE
    let mut param = vec![0, 0, 0, 0];
    param.extend_from_slice(&page);
    assert_good(&k.exec(&a, &[0x15, 0x10, 0, 0, param.len() as u8, 0], &param));
    let r = k.exec(&b, &[0x00; 6], &[]);
    assert_eq!(sense_of(&r), (0x06, 0x2A, 0x01));
    assert_eq!(r.sense.as_ref().unwrap()[0], 0x72, "descriptor format");
    // A non-changeable field.
    param[4 + 3] ^= 0xF0;
    assert_eq!(
        sense_of(&k.exec(&a, &[0x15, 0x10, 0, 0, param.len() as u8, 0], &param)),
        (ILLEGAL, 0x26, 0)
    );
    // Saved pages are not supported.
    assert_eq!(
        sense_of(&k.exec(&a, &[0x1A, 0, 0xC8, 0, 255, 0], &[])),
        (ILLEGAL, 0x39, 0)
    );
    // MODE SENSE(10) with LLBAA returns a long block descriptor.
    let r = k.exec(&a, &[0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(u16::from_be_bytes([r.data_in[6], r.data_in[7]]), 16);
}

#[test]
fn software_write_protect_through_mode_select() {
    let k = Kit::new();
    let a = k.ready("a");
    let r = k.exec(&a, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]);
    let mut param = vec![0, 0, 0, 0];
    param.extend_from_slice(&r.data_in[4..]);
    param[4 + 4] |= 0x08;
    assert_good(&k.exec(&a, &[0x15, 0x10, 0, 0, param.len() as u8, 0], &param));
    assert_eq!(
        sense_of(&k.exec(&a, &write16(0, 1, 0), &[0; 512])),
        (0x07, 0x27, 0x02)
    );
    assert_good(&k.exec(&a, &read16(0, 1), &[]));
}

#[test]
fn compare_and_write() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write16(4, 2, 0), &[b'A'; 1024]));
    let mut caw = vec![0x89, 0];
    caw.extend_from_slice(&4u64.to_be_bytes());
    caw.extend_from_slice(&[0, 0, 0, 2, 0, 0]);
    let mut data = vec![b'A'; 1024];
    data[1024 - 27] = b'C';
    data.extend_from_slice(&[b'B'; 1024]);
    let r = k.exec(&n, &caw, &data);
    assert_eq!(sense_of(&r), (0x0E, 0x1D, 0x00));
    assert_eq!(fixed_information(&r), 1024 - 27);
    assert_eq!(k.dev.snapshot(4 * 512, 1024), vec![b'A'; 1024]);
    data[1024 - 27] = b'A';
    assert_good(&k.exec(&n, &caw, &data));
    assert_eq!(k.dev.snapshot(4 * 512, 1024), vec![b'B'; 1024]);
    // Data-Out of the wrong size.
    assert_eq!(sense_of(&k.exec(&n, &caw, &data[..1024])).0, ILLEGAL);
}

#[test]
fn verify_bytchk() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(0, 2), &[3u8; 1024]));
    let mut v = vec![0x2F, 0x02, 0, 0, 0, 0, 0, 0, 2, 0];
    let mut data = vec![3u8; 1024];
    assert_good(&k.exec(&n, &v, &data));
    data[700] = 9;
    let r = k.exec(&n, &v, &data);
    assert_eq!(sense_of(&r), (0x0E, 0x1D, 0));
    assert_eq!(fixed_information(&r), 700);
    v[1] = 0;
    assert_good(&k.exec(&n, &v, &[]));
    v[1] = 0x06; // BYTCHK 11b: one block compared with each
    assert_good(&k.exec(&n, &v, &[3u8; 512]));
}

#[test]
fn unmap_write_same_and_get_lba_status() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(0, 8), &[1u8; 8 * 512]));
    let mut param = vec![0, 22, 0, 16, 0, 0, 0, 0];
    param.extend_from_slice(&2u64.to_be_bytes());
    param.extend_from_slice(&3u32.to_be_bytes());
    param.extend_from_slice(&[0; 4]);
    assert_good(&k.exec(&n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &param));
    assert_eq!(k.dev.snapshot(2 * 512, 3 * 512), vec![0; 3 * 512]);
    let r = k.exec(
        &n,
        &[0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 24, 0, 0],
        &[],
    );
    assert_good(&r);
    assert_eq!(&r.data_in[8..16], &2u64.to_be_bytes());
    assert_eq!(&r.data_in[16..20], &3u32.to_be_bytes());
    assert_eq!(r.data_in[20], 0x01, "deallocated");
    // Out of range descriptor.
    param[8..16].copy_from_slice(&BLOCKS.to_be_bytes());
    assert_eq!(
        sense_of(&k.exec(&n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &param)),
        (ILLEGAL, 0x21, 0)
    );
    // WRITE SAME(10) pattern, then with UNMAP.
    let ws = [0x41, 0, 0, 0, 0, 100, 0, 0, 4, 0];
    assert_good(&k.exec(&n, &ws, &[0xEE; 512]));
    assert_eq!(k.dev.snapshot(100 * 512, 4 * 512), vec![0xEE; 4 * 512]);
    let ws_unmap = [0x41, 0x08, 0, 0, 0, 100, 0, 0, 4, 0];
    assert_good(&k.exec(&n, &ws_unmap, &[0; 512]));
    assert_eq!(k.dev.snapshot(100 * 512, 4 * 512), vec![0; 4 * 512]);
    // ANCHOR is not supported; Data-Out must be exactly one block.
    assert_eq!(
        sense_of(&k.exec(&n, &[0x41, 0x18, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512])),
        (ILLEGAL, 0x24, 0)
    );
    assert_eq!(sense_of(&k.exec(&n, &ws, &[0; 256])).0, ILLEGAL);
    // Zero blocks: to the end of the medium.
    assert_good(&k.exec(&n, &[0x41, 0, 0, 0, 0x07, 0xF0, 0, 0, 0, 0], &[0xAB; 512]));
    assert_eq!(k.dev.snapshot((BLOCKS - 1) * 512, 512), vec![0xAB; 512]);
}

#[test]
fn orwrite_and_write_atomic() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write16(0, 1, 0), &[0xA0; 512]));
    let mut c = write16(0, 1, 0);
    c[0] = 0x8B;
    assert_good(&k.exec(&n, &c, &[0x05; 512]));
    assert_eq!(k.dev.snapshot(0, 512), vec![0xA5; 512]);
    let mut wa = vec![0x9C, 0];
    wa.extend_from_slice(&1u64.to_be_bytes());
    wa.extend_from_slice(&[0, 0, 0, 1, 0, 0]);
    assert_good(&k.exec(&n, &wa, &[0x77; 512]));
    assert_eq!(k.dev.snapshot(512, 512), vec![0x77; 512]);
}

#[test]
fn pre_fetch_reports_condition_met() {
    let k = Kit::new();
    let n = k.ready("i1");
    let r = k.exec(&n, &[0x34, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
    assert_eq!(r.status, ScsiStatus::ConditionMet);
    let r = k.exec(&n, &[0x34, 0, 0, 0, 0x10, 0, 0, 0, 0, 0], &[]);
    assert_eq!(sense_of(&r), (ILLEGAL, 0x21, 0));
}

fn prout(sa: u8, kind: u8, key: u64, sa_key: u64, flags: u8) -> (Vec<u8>, Vec<u8>) {
    let cdb = vec![0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    (cdb, p)
}

fn pr(k: &Kit, n: &ItNexus, sa: u8, kind: u8, key: u64, sa_key: u64) -> ScsiResponse {
    let (c, p) = prout(sa, kind, key, sa_key, 0);
    k.exec(n, &c, &p)
}

fn can_read(k: &Kit, n: &ItNexus) -> bool {
    k.exec(n, &read10(1, 1), &[]).status == ScsiStatus::Good
}

fn can_write(k: &Kit, n: &ItNexus) -> bool {
    k.exec(n, &write10(1, 1), &[0; 512]).status == ScsiStatus::Good
}

#[test]
fn persistent_reservation_conflict_table() {
    // (type, registered reader, registered writer, unregistered reader, unregistered writer)
    let table = [
        (1u8, true, false, true, false),
        (3, false, false, false, false),
        (5, true, true, true, false),
        (6, true, true, false, false),
        (7, true, true, true, false),
        (8, true, true, false, false),
    ];
    for (kind, rr, rw, ur, uw) in table {
        let k = Kit::new();
        let a = k.ready("a");
        let b = k.ready("b");
        assert_good(&pr(&k, &a, 0x06, 0, 0, 0xA));
        assert_good(&pr(&k, &b, 0x06, 0, 0, 0xB));
        assert_good(&pr(&k, &a, 0x01, kind, 0xA, 0));
        assert!(can_read(&k, &a) && can_write(&k, &a), "type {kind}");
        assert_eq!(
            (can_read(&k, &b), can_write(&k, &b)),
            (rr, rw),
            "type {kind} registered"
        );
        assert_good(&pr(&k, &b, 0x00, 0, 0xB, 0));
        assert_eq!(
            (can_read(&k, &b), can_write(&k, &b)),
            (ur, uw),
            "type {kind} unregistered"
        );
        assert_eq!(
            k.exec(&b, &write10(1, 1), &[0; 512]).status == ScsiStatus::ReservationConflict,
            !uw
        );
        // INQUIRY and READ CAPACITY are never in conflict.
        assert_good(&k.exec(&b, &[0x12, 0, 0, 0, 36, 0], &[]));
        assert_good(&k.exec(&b, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
        assert_good(&pr(&k, &a, 0x02, kind, 0xA, 0));
        assert!(can_write(&k, &b));
    }
}

#[test]
fn persistent_reservation_registration_rules_and_preempt() {
    let k = Kit::new();
    let a = k.ready("a");
    let b = k.ready("b");
    // Registering with a wrong key conflicts.
    assert_eq!(
        pr(&k, &a, 0x00, 0, 5, 0xA).status,
        ScsiStatus::ReservationConflict
    );
    assert_good(&pr(&k, &a, 0x00, 0, 0, 0xA));
    assert_eq!(
        pr(&k, &a, 0x00, 0, 0xB, 0xC).status,
        ScsiStatus::ReservationConflict
    );
    assert_good(&pr(&k, &b, 0x06, 0, 0, 0xB));
    let keys = k.exec(&a, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&keys.data_in[4..8], &16u32.to_be_bytes());
    let gen = u32::from_be_bytes(keys.data_in[..4].try_into().unwrap());
    assert_good(&pr(&k, &a, 0x01, 3, 0xA, 0));
    // Reservation by another registrant conflicts.
    assert_eq!(
        pr(&k, &b, 0x01, 3, 0xB, 0).status,
        ScsiStatus::ReservationConflict
    );
    // b preempts a: a loses its registration and is told so.
    assert_good(&pr(&k, &b, 0x04, 1, 0xB, 0xA));
    assert_eq!(sense_of(&k.exec(&a, &[0x00; 6], &[])), (0x06, 0x2A, 0x05));
    let keys = k.exec(&a, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(
        u32::from_be_bytes(keys.data_in[..4].try_into().unwrap()),
        gen + 1
    );
    assert_eq!(&keys.data_in[8..16], &0xBu64.to_be_bytes());
    let res = k.exec(&a, &[0x5E, 1, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&res.data_in[8..16], &0xBu64.to_be_bytes());
    assert_eq!(res.data_in[21], 0x01);
    // Wrong type on release.
    assert_eq!(
        sense_of(&pr(&k, &b, 0x02, 3, 0xB, 0)),
        (ILLEGAL, 0x26, 0x04)
    );
    // CLEAR removes everything.
    assert_good(&pr(&k, &b, 0x03, 0, 0xB, 0));
    let res = k.exec(&a, &[0x5E, 1, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&res.data_in[4..8], &[0; 4]);
    // REPORT CAPABILITIES and the service action range.
    let caps = k.exec(&a, &[0x5E, 2, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&caps.data_in[..2], &[0, 8]);
    assert_eq!(
        sense_of(&k.exec(&a, &[0x5E, 4, 0, 0, 0, 0, 0, 1, 0, 0], &[])),
        (ILLEGAL, 0x24, 0)
    );
    // SPEC_I_PT: see spec_i_pt_registers_the_named_initiator_ports.
}

/// An iSCSI TransportID with an ISID (SPC-4 §7.6.4.6, format 01b).
fn iscsi_transport_id(n: &ItNexus) -> Vec<u8> {
    let mut body = n.initiator_port_name().into_bytes();
    body.push(0);
    while body.len() % 4 != 0 {
        body.push(0);
    }
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(body.len() as u16).to_be_bytes());
    t.extend_from_slice(&body);
    t
}

#[test]
fn spec_i_pt_registers_the_named_initiator_ports() {
    let k = Kit::new();
    let a = k.ready("iqn.a");
    let b = k.ready("iqn.b");
    let c = k.ready("iqn.c");
    let with_ids = |key: u64, sa_key: u64, ids: &[&ItNexus]| {
        let list: Vec<u8> = ids.iter().flat_map(|n| iscsi_transport_id(n)).collect();
        let (_, p) = prout(0x00, 0, key, sa_key, 0x08);
        let mut p = p.to_vec();
        p.extend_from_slice(&(list.len() as u32).to_be_bytes());
        p.extend_from_slice(&list);
        let mut cdb = vec![0x5F, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[5..9].copy_from_slice(&(p.len() as u32).to_be_bytes());
        (cdb, p)
    };
    // REPORT CAPABILITIES says SIP_C.
    let caps = k.exec(&a, &[0x5E, 2, 0, 0, 0, 0, 0, 8, 0, 0], &[]);
    assert_eq!(caps.data_in[2] & 0x08, 0x08);
    // a registers itself and b in one command: both hold key 0xA.
    let (cdb, p) = with_ids(0, 0xA, &[&b]);
    assert_good(&k.exec(&a, &cdb, &p));
    let keys = k.exec(&a, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&keys.data_in[4..8], &16u32.to_be_bytes());
    assert_good(&pr(&k, &b, 1, 1, 0xA, 0));
    assert_good(&pr(&k, &b, 2, 1, 0xA, 0));
    // From a registered nexus SPEC_I_PT is INVALID FIELD IN CDB; naming a registered
    // port is a conflict and registers nobody; a bad TransportID is refused.
    let (cdb, p) = with_ids(0xA, 0xA, &[&c]);
    assert_eq!(sense_of(&k.exec(&a, &cdb, &p)), (0x05, 0x24, 0x00));
    let (cdb, p) = with_ids(0, 0xC, &[&b]);
    assert_eq!(k.exec(&c, &cdb, &p).status, ScsiStatus::ReservationConflict);
    let keys = k.exec(&a, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(
        &keys.data_in[4..8],
        &16u32.to_be_bytes(),
        "c was not registered"
    );
    let (cdb, mut p) = with_ids(0, 0xC, &[&a]);
    p[28] = 0x05; // format 00b without an ISID: not an initiator port
    assert_eq!(sense_of(&k.exec(&c, &cdb, &p)).1, 0x26);
    // REGISTER AND IGNORE EXISTING KEY takes no SPEC_I_PT, and no TransportIDs.
    let (cdb, p) = prout(0x06, 0, 0, 0xC, 0x08);
    assert_eq!(sense_of(&k.exec(&c, &cdb, &p)), (0x05, 0x26, 0x00));
    let (mut cdb, p) = with_ids(0, 0xC, &[&b]);
    cdb[1] = 0x06;
    assert_eq!(sense_of(&k.exec(&c, &cdb, &p)), (0x05, 0x1A, 0x00));
}

#[test]
fn registrants_only_reservation_goes_with_its_holder() {
    let k = Kit::new();
    let a = k.ready("a");
    let b = k.ready("b");
    assert_good(&pr(&k, &a, 0x06, 0, 0, 0xA));
    assert_good(&pr(&k, &b, 0x06, 0, 0, 0xB));
    assert_good(&pr(&k, &a, 0x01, 5, 0xA, 0));
    assert_good(&pr(&k, &a, 0x00, 0, 0xA, 0));
    assert_eq!(sense_of(&k.exec(&b, &[0x00; 6], &[])), (0x06, 0x2A, 0x04));
    let res = k.exec(&b, &[0x5E, 1, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&res.data_in[4..8], &[0; 4]);
}

#[test]
fn aptpl_state_survives_restart() {
    let dir = std::env::temp_dir().join(format!("bulwark-scsi-pr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lun0.pr");
    let _ = std::fs::remove_file(&file);
    let config = LuConfig {
        pr_file: Some(file.clone()),
        ..LuConfig::default()
    };
    {
        let k = Kit::with(config.clone(), MemDevice::new(BLOCKS * 512));
        let a = k.ready("a");
        let (c, p) = prout(0x06, 0, 0, 0x1234, 0x01);
        assert_good(&k.exec(&a, &c, &p));
        assert_good(&pr(&k, &a, 0x01, 1, 0x1234, 0));
    }
    let k = Kit::with(config, MemDevice::new(BLOCKS * 512));
    let b = k.ready("b");
    assert_eq!(
        k.exec(&b, &write10(0, 1), &[0; 512]).status,
        ScsiStatus::ReservationConflict
    );
    let keys = k.exec(&b, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&keys.data_in[8..16], &0x1234u64.to_be_bytes());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn legacy_reservation() {
    let k = Kit::new();
    let a = k.ready("a");
    let b = k.ready("b");
    assert_good(&k.exec(&a, &[0x16, 0, 0, 0, 0, 0], &[]));
    assert_good(&k.exec(&a, &[0x16, 0, 0, 0, 0, 0], &[]));
    assert_eq!(
        k.exec(&b, &[0x16, 0, 0, 0, 0, 0], &[]).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        k.exec(&b, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).status,
        ScsiStatus::ReservationConflict
    );
    assert_good(&k.exec(&b, &[0x17, 0, 0, 0, 0, 0], &[]));
    assert_good(&k.exec(&b, &[0x12, 0, 0, 0, 36, 0], &[]));
    assert_good(&k.exec(&a, &[0x1A, 0, 0x3F, 0, 255, 0], &[]));
    // Nexus loss releases it.
    k.target.nexus_loss(&a);
    assert_good(&k.exec(&b, &[0x16, 0, 0, 0, 0, 0], &[]));
    // A LU reset too, and it raises 29/03.
    k.target.reset(ResetKind::LogicalUnit, Some(0), &a);
    assert_eq!(sense_of(&k.exec(&b, &[0x00; 6], &[])), (0x06, 0x29, 0x03));
    let c = k.ready("c");
    assert_good(&k.exec(&c, &[0x16, 0, 0, 0, 0, 0], &[]));
    k.target.reset(ResetKind::TargetCold, None, &a);
    assert_eq!(sense_of(&k.exec(&c, &[0x00; 6], &[])), (0x06, 0x29, 0x01));
}

#[test]
fn report_supported_operation_codes() {
    let k = Kit::new();
    let n = k.ready("i1");
    let r = k.exec(&n, &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0], &[]);
    assert_good(&r);
    let len = u32::from_be_bytes(r.data_in[..4].try_into().unwrap()) as usize;
    assert_eq!(len % 8, 0);
    assert_eq!(r.data_in.len(), len + 4);
    // With RCTD every descriptor carries a timeouts descriptor.
    let r = k.exec(
        &n,
        &[0xA3, 0x0C, 0x80, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0],
        &[],
    );
    assert_eq!(r.data_in[4 + 5] & 0x02, 0x02);
    // One command: READ(10).
    let r = k.exec(
        &n,
        &[0xA3, 0x0C, 0x01, 0x28, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0],
        &[],
    );
    assert_eq!(&r.data_in[..4], &[0, 0x03, 0, 10]);
    assert_eq!(r.data_in[4], 0x28);
    // A command with service actions asked without one.
    let r = k.exec(
        &n,
        &[0xA3, 0x0C, 0x01, 0x9E, 0, 0x10, 0, 0, 0xFF, 0xFF, 0, 0],
        &[],
    );
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    let r = k.exec(
        &n,
        &[0xA3, 0x0C, 0x02, 0x9E, 0, 0x10, 0, 0, 0xFF, 0xFF, 0, 0],
        &[],
    );
    assert_eq!(&r.data_in[..4], &[0, 0x03, 0, 16]);
    let r = k.exec(&n, &[0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0], &[]);
    assert_good(&r);
    let r = k.exec(&n, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(&r.data_in[4..8], &[0x00, 0x8F, 0, 1]);
}

#[test]
fn sanitize() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(0, 1), &[1; 512]));
    let mut p = vec![0x01, 0, 0, 4];
    p.extend_from_slice(&[0xAA; 4]);
    assert_good(&k.exec(&n, &[0x48, 0x01, 0, 0, 0, 0, 0, 0, 8, 0], &p));
    assert_eq!(k.dev.snapshot(0, 512), vec![0xAA; 512]);
    assert_eq!(
        sense_of(&k.exec(&n, &[0x48, 0x01, 0, 0, 0, 0, 0, 0, 4, 0], &p)),
        (ILLEGAL, 0x24, 0)
    );
    assert_good(&k.exec(&n, &[0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    assert_eq!(k.dev.snapshot(0, 512), vec![0; 512]);
    assert_eq!(
        sense_of(&k.exec(&n, &[0x48, 0x03, 0, 0, 0, 0, 0, 0, 0, 0], &[])),
        (ILLEGAL, 0x24, 0)
    );
    assert_eq!(
        sense_of(&k.exec(&n, &[0x48, 0x1F, 0, 0, 0, 0, 0, 0, 8, 0], &[0; 8])),
        (ILLEGAL, 0x24, 0)
    );
}

fn xcopy_param(naa: &[u8; 16], blocks: u16, src: u64, dst: u64, dst_index: u16) -> Vec<u8> {
    let mut p = vec![0u8; 16];
    p[0] = 1;
    p[2..4].copy_from_slice(&32u16.to_be_bytes());
    p[8..12].copy_from_slice(&28u32.to_be_bytes());
    let mut t = vec![0xE4, 0x00, 0, 0, 0x01, 0x03, 0, 16];
    t.extend_from_slice(naa);
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&[0, 0, 2, 0]);
    p.extend_from_slice(&t);
    let mut s = vec![0x02, 0, 0, 0x18, 0, 0];
    s.extend_from_slice(&dst_index.to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(&blocks.to_be_bytes());
    s.extend_from_slice(&src.to_be_bytes());
    s.extend_from_slice(&dst.to_be_bytes());
    p.extend_from_slice(&s);
    p
}

#[test]
fn extended_copy_and_copy_results() {
    let mut naa = [0u8; 16];
    naa[0] = 0x60;
    naa[15] = 7;
    let k = Kit::with(
        LuConfig {
            naa,
            ..LuConfig::default()
        },
        MemDevice::new(BLOCKS * 512),
    );
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(0, 4), &[b'A'; 2048]));
    let rcr = [0x84, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    assert_eq!(sense_of(&k.exec(&n, &rcr, &[])), (ILLEGAL, 0x24, 0));
    let p = xcopy_param(&naa, 4, 0, 100, 0);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x83;
    cdb[10..14].copy_from_slice(&(p.len() as u32).to_be_bytes());
    assert_good(&k.exec(&n, &cdb, &p));
    assert_eq!(k.dev.snapshot(100 * 512, 2048), vec![b'A'; 2048]);
    let r = k.exec(&n, &rcr, &[]);
    assert_good(&r);
    assert_eq!(r.data_in[4], 0x01);
    // Bad destination index and beyond the end: COPY ABORTED.
    let p = xcopy_param(&naa, 4, 0, 100, 1);
    assert_eq!(sense_of(&k.exec(&n, &cdb, &p)).0, 0x0A);
    let p = xcopy_param(&naa, 4, 0, BLOCKS - 1, 0);
    assert_eq!(sense_of(&k.exec(&n, &cdb, &p)).0, 0x0A);
    // Truncated parameter list.
    assert_eq!(sense_of(&k.exec(&n, &cdb, &p[..40])), (ILLEGAL, 0x1A, 0));
    // Operating parameters.
    let r = k.exec(
        &n,
        &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0],
        &[],
    );
    assert_good(&r);
    assert_eq!(&r.data_in[8..10], &8u16.to_be_bytes());
}

#[test]
fn compare_and_write_of_zero_blocks_refuses_data() {
    let k = Kit::new();
    let n = k.ready("i1");
    // An initiator asking for 256 blocks puts 0 in the one-byte field and sends 256
    // blocks twice: all of it must reach the command, which refuses it.
    let mut caw = vec![0x89, 0];
    caw.extend_from_slice(&0u64.to_be_bytes());
    caw.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    assert_eq!(k.target.data_out_len(0, &caw), None);
    let r = k.exec(&n, &caw, &vec![b'A'; 2 * 256 * 512]);
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    assert_eq!(&r.sense.as_ref().unwrap()[15..18], &[0xC0, 0, 13]);
    // Zero blocks without data is a no-op (SBC-3 §5.2).
    assert_good(&k.exec(&n, &caw, &[]));
    // The largest length the field can say is what VPD B0 reports.
    let b0 = k.exec(&n, &[0x12, 1, 0xB0, 0, 64, 0], &[]);
    assert_eq!(b0.data_in[5], 255);
    caw[13] = 255;
    assert_eq!(k.target.data_out_len(0, &caw), Some(2 * 255 * 512));
}

#[test]
fn write_same_unmap_deallocates_whatever_the_data() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(BLOCKS as u32 - 3, 3), &[0xFF; 3 * 512]));
    // WRITE SAME(10) with UNMAP, zero blocks (to the end) and a 0xFF block.
    let mut ws = [0x41, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    ws[2..6].copy_from_slice(&(BLOCKS as u32 - 3).to_be_bytes());
    assert_good(&k.exec(&n, &ws, &[0xFF; 512]));
    let r = k.exec(&n, &read10(BLOCKS as u32 - 3, 3), &[]);
    assert_eq!(&r.data_in[..], &[0u8; 3 * 512][..]);
    let mut gls = vec![0x9E, 0x12];
    gls.extend_from_slice(&(BLOCKS - 3).to_be_bytes());
    gls.extend_from_slice(&[0, 0, 0, 24, 0, 0]);
    assert_eq!(k.exec(&n, &gls, &[]).data_in[20], 0x01, "deallocated");
    // A thick device cannot deallocate (LBPWS=0): the UNMAP bit is refused, as LIO
    // does and libiscsi's WriteSame10.UnmapVPD expects, and nothing is written; without
    // it the data is written. UNMAP and SANITIZE BLOCK ERASE are not implemented there
    // and not reported as supported.
    let k = Kit::with(LuConfig::default(), MemDevice::thick(BLOCKS * 512));
    let n = k.ready("i1");
    let r = k.exec(&n, &[0x41, 0x08, 0, 0, 0, 5, 0, 0, 2, 0], &[0xFF; 512]);
    assert_eq!(sense_of(&r), (0x05, 0x24, 0x00));
    assert_eq!(k.dev.snapshot(5 * 512, 1024), vec![0; 1024]);
    assert_good(&k.exec(&n, &[0x41, 0, 0, 0, 0, 5, 0, 0, 2, 0], &[0xFF; 512]));
    assert_eq!(k.dev.snapshot(5 * 512, 1024), vec![0xFF; 1024]);
    let unmap = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    assert_eq!(sense_of(&k.exec(&n, &unmap, &[0; 24])), (0x05, 0x20, 0x00));
    let block_erase = [0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(sense_of(&k.exec(&n, &block_erase, &[])), (0x05, 0x24, 0x00));
    // REPORT SUPPORTED OPERATION CODES, one command: SUPPORT 001b (not supported).
    let rsoc = |opcode: u8, sa: u8| {
        let options = if sa == 0xFF { 1 } else { 2 };
        let cdb = [
            0xA3,
            0x0C,
            options,
            opcode,
            0,
            sa.min(0x1F),
            0,
            0,
            1,
            0,
            0,
            0,
        ];
        k.exec(&n, &cdb, &[]).data_in[1] & 0x07
    };
    assert_eq!(rsoc(0x42, 0xFF), 0x01, "UNMAP not supported");
    assert_eq!(rsoc(0x48, 0x02), 0x01, "SANITIZE BLOCK ERASE not supported");
    assert_eq!(rsoc(0x48, 0x01), 0x03, "SANITIZE OVERWRITE supported");
    // No block erase, so no WABEREQ in the block device characteristics page.
    let b1 = k.exec(&n, &[0x12, 1, 0xB1, 0, 64, 0], &[]);
    assert_eq!(b1.data_in[7] & 0xC0, 0);
}

#[test]
fn write_same_limit_is_reported_and_enforced() {
    for (bs, max) in [(512u32, 0xFFFFu64), (4096, 16384)] {
        let blocks = 1u64 << 17;
        let k = Kit::with(
            LuConfig {
                block_size: bs,
                ..LuConfig::default()
            },
            MemDevice::new(blocks * u64::from(bs)),
        );
        let n = k.ready("i1");
        let b0 = k.exec(&n, &[0x12, 1, 0xB0, 0, 64, 0], &[]);
        assert_eq!(
            u64::from_be_bytes(b0.data_in[36..44].try_into().unwrap()),
            max
        );
        // The largest transfer stays within MAXIMUM TRANSFER LENGTH.
        let max_transfer = u32::from_be_bytes(b0.data_in[8..12].try_into().unwrap());
        assert!(u64::from(max_transfer) * u64::from(bs) <= 8 << 20);
        let ws16 = |count: u32| {
            let mut c = vec![0x93, 0x08];
            c.extend_from_slice(&0u64.to_be_bytes());
            c.extend_from_slice(&count.to_be_bytes());
            c.extend_from_slice(&[0, 0]);
            c
        };
        let zero = vec![0u8; bs as usize];
        assert_good(&k.exec(&n, &ws16(max as u32), &zero));
        assert_eq!(
            sense_of(&k.exec(&n, &ws16(max as u32 + 1), &zero)),
            (ILLEGAL, 0x24, 0)
        );
    }
}

#[test]
fn block_device_characteristics_report_wabereq() {
    let k = Kit::new();
    let n = k.ready("i1");
    let b1 = k.exec(&n, &[0x12, 1, 0xB1, 0, 64, 0], &[]);
    assert_good(&b1);
    // WABEREQ 01b: reads after a block erase complete with GOOD (and zeroes).
    assert_eq!(b1.data_in[7] >> 6, 0x01);
    assert_eq!((b1.data_in[7] >> 4) & 0x03, 0x00, "WACEREQ");
}

fn sanitize_overwrite_cdb(immed: bool, ause: bool) -> [u8; 10] {
    let b1 = 0x01 | if immed { 0x80 } else { 0 } | if ause { 0x20 } else { 0 };
    [0x48, b1, 0, 0, 0, 0, 0, 0, 8, 0]
}

/// OVERWRITE parameter list: one pass of a 4-byte pattern.
const OVERWRITE_AA: [u8; 8] = [0x01, 0, 0, 4, 0xAA, 0xAA, 0xAA, 0xAA];

/// A unit whose sanitize writes `bytes_per_s`.
fn sanitize_kit(bytes_per_s: u64) -> Kit {
    Kit::with(
        LuConfig {
            sanitize_bytes_per_s: bytes_per_s,
            ..LuConfig::default()
        },
        MemDevice::new(BLOCKS * 512),
    )
}

/// Polls TEST UNIT READY until the sanitize operation is over (bounded).
fn wait_sanitized(k: &Kit, n: &ItNexus) -> ScsiResponse {
    for _ in 0..1000 {
        let r = k.exec(n, &[0x00; 6], &[]);
        if !(r.status == ScsiStatus::CheckCondition && sense_of(&r) == (0x02, 0x04, 0x1B)) {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("sanitize did not finish");
}

#[test]
fn sanitize_refuses_reserved_cdb_fields() {
    let k = Kit::new();
    let n = k.ready("i1");
    let mut erase = [0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0];
    erase[1] |= 0x40;
    let r = k.exec(&n, &erase, &[]);
    assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0));
    assert_eq!(&r.sense.as_ref().unwrap()[15..18], &[0xC0 | 0x08 | 6, 0, 1]);
    for byte in 2..=6 {
        let mut c = [0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0];
        c[byte] = byte as u8;
        let r = k.exec(&n, &c, &[]);
        assert_eq!(sense_of(&r), (ILLEGAL, 0x24, 0), "byte {byte}");
        assert_eq!(r.sense.as_ref().unwrap()[17], byte as u8);
        let mut c = sanitize_overwrite_cdb(false, false);
        c[byte] = byte as u8;
        assert_eq!(
            sense_of(&k.exec(&n, &c, &OVERWRITE_AA)),
            (ILLEGAL, 0x24, 0),
            "byte {byte}"
        );
    }
    // Nothing was started.
    assert_good(&k.exec(&n, &[0x00; 6], &[]));
}

#[test]
fn sanitize_runs_in_the_background_and_survives_resets() {
    // 1 MiB at 4 MiB/s: about 250 ms.
    let k = sanitize_kit(4 << 20);
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(0, 1), &[1; 512]));
    let started = std::time::Instant::now();
    assert_good(&k.exec(&n, &sanitize_overwrite_cdb(true, false), &OVERWRITE_AA));
    assert!(
        started.elapsed() < std::time::Duration::from_millis(200),
        "IMMED=1 returns at once"
    );
    // Medium access and TEST UNIT READY: NOT READY, SANITIZE IN PROGRESS, with progress.
    let r = k.exec(&n, &[0x00; 6], &[]);
    assert_eq!(sense_of(&r), (0x02, 0x04, 0x1B));
    assert_eq!(r.sense.as_ref().unwrap()[15] & 0x80, 0x80, "SKSV");
    assert_eq!(
        sense_of(&k.exec(&n, &read16(0, 1), &[])),
        (0x02, 0x04, 0x1B)
    );
    assert_eq!(
        sense_of(&k.exec(&n, &write10(0, 1), &[2; 512])),
        (0x02, 0x04, 0x1B)
    );
    assert_eq!(
        sense_of(&k.exec(&n, &[0x1B, 1, 0, 0, 1, 0], &[])),
        (0x02, 0x04, 0x1B)
    );
    // A second SANITIZE is refused too.
    assert_eq!(
        sense_of(&k.exec(&n, &sanitize_overwrite_cdb(true, false), &OVERWRITE_AA)),
        (0x02, 0x04, 0x1B)
    );
    // INQUIRY, REPORT LUNS and REQUEST SENSE still work; REQUEST SENSE reports progress.
    assert_good(&k.exec(&n, &[0x12, 0, 0, 0, 96, 0], &[]));
    assert_good(&k.exec(&n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[]));
    let rs = k.exec(&n, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_good(&rs);
    assert_eq!(
        (rs.data_in[2], rs.data_in[12], rs.data_in[13]),
        (0x02, 0x04, 0x1B)
    );
    assert_eq!(rs.data_in[15], 0x80);
    // Task management and resets do not stop it; a new nexus sees it too.
    k.target.abort_tasks(0, None);
    k.target.reset(ResetKind::LogicalUnit, Some(0), &n);
    k.target.reset(ResetKind::TargetCold, None, &n);
    k.target.nexus_loss(&n);
    let m = nexus("i2");
    assert_eq!(sense_of(&k.exec(&m, &[0x00; 6], &[])), (0x06, 0x29, 0x00));
    assert_eq!(sense_of(&k.exec(&m, &[0x00; 6], &[])), (0x02, 0x04, 0x1B));
    // It ends by itself, having overwritten everything.
    assert_good(&wait_sanitized(&k, &m));
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(200),
        "throttled"
    );
    assert_eq!(k.dev.snapshot(0, 512), vec![0xAA; 512]);
    assert_eq!(k.dev.snapshot((BLOCKS - 1) * 512, 512), vec![0xAA; 512]);
    let rs = k.exec(&m, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!((rs.data_in[2], rs.data_in[12]), (0x00, 0x00), "NO SENSE");
}

#[test]
fn sanitize_without_immed_returns_when_done() {
    let k = Arc::new(sanitize_kit(8 << 20));
    let n = k.ready("i1");
    let k2 = k.clone();
    let n2 = n.clone();
    let waiter = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let r = k2.exec(&n2, &sanitize_overwrite_cdb(false, false), &OVERWRITE_AA);
        (r, started.elapsed())
    });
    let (r, took) = waiter.join().unwrap();
    assert_good(&r);
    assert!(took >= std::time::Duration::from_millis(100), "{took:?}");
    // Status came after the operation: the unit is ready and overwritten.
    assert_good(&k.exec(&n, &[0x00; 6], &[]));
    assert_eq!(k.dev.snapshot((BLOCKS - 1) * 512, 512), vec![0xAA; 512]);
}

#[test]
fn aborting_a_waiting_sanitize_leaves_the_operation_running() {
    // 1 MiB at 1 MiB/s: about a second.
    let k = Arc::new(sanitize_kit(1 << 20));
    let n = k.ready("i1");
    // Ready before the sanitize begins: its TEST UNIT READY must find the unit idle.
    let other = k.ready("other");
    let k2 = k.clone();
    let n2 = n.clone();
    let waiter = std::thread::spawn(move || {
        k2.exec(&n2, &sanitize_overwrite_cdb(false, false), &OVERWRITE_AA)
    });
    for _ in 0..100 {
        if k.exec(&other, &[0x00; 6], &[]).status != ScsiStatus::Good {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Another nexus's abort does not end the wait; this nexus's does.
    k.target.abort_tasks(0, Some(&other));
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(!waiter.is_finished());
    k.target.abort_tasks(0, Some(&n));
    let r = waiter.join().unwrap();
    assert_eq!(r.status, ScsiStatus::TaskAborted);
    assert_eq!(
        sense_of(&k.exec(&other, &[0x00; 6], &[])),
        (0x02, 0x04, 0x1B)
    );
    assert_good(&wait_sanitized(&k, &other));
}

#[test]
fn in_flight_writes_are_refused_once_sanitize_began() {
    let k = sanitize_kit(1 << 20);
    let n = k.ready("i1");
    let lu = k.target.lu(0).unwrap();
    assert!(lu.medium_shared().is_ok());
    assert_good(&k.exec(&n, &sanitize_overwrite_cdb(true, false), &OVERWRITE_AA));
    let e = lu.medium_shared().map(drop).unwrap_err();
    assert_eq!((e.asc, e.ascq), (0x04, 0x1B));
    assert!(lu.medium_exclusive().is_err());
    assert_good(&wait_sanitized(&k, &n));
    assert!(lu.medium_exclusive().is_ok());
}

#[test]
fn failed_sanitize_holds_until_exit_failure_mode() {
    let k = sanitize_kit(0);
    let n = k.ready("i1");
    let exit = [0x48, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0];
    // Restricted completion mode (AUSE=0): only a successful sanitize leaves it.
    k.dev.fail_writes.store(true, Ordering::Relaxed);
    let r = k.exec(&n, &sanitize_overwrite_cdb(false, false), &OVERWRITE_AA);
    assert_eq!(sense_of(&r), (0x03, 0x31, 0x03));
    assert_eq!(sense_of(&k.exec(&n, &[0x00; 6], &[])), (0x03, 0x31, 0x03));
    assert_eq!(
        sense_of(&k.exec(&n, &read10(0, 1), &[])),
        (0x03, 0x31, 0x03)
    );
    assert_good(&k.exec(&n, &[0x12, 0, 0, 0, 96, 0], &[]));
    let rs = k.exec(&n, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!(
        (rs.data_in[2], rs.data_in[12], rs.data_in[13]),
        (0x03, 0x31, 0x03)
    );
    assert_eq!(sense_of(&k.exec(&n, &exit, &[])), (ILLEGAL, 0x24, 0));
    assert_eq!(
        sense_of(&k.exec(&n, &sanitize_overwrite_cdb(false, true), &OVERWRITE_AA)),
        (ILLEGAL, 0x24, 0)
    );
    k.dev.fail_writes.store(false, Ordering::Relaxed);
    assert_good(&k.exec(&n, &sanitize_overwrite_cdb(false, false), &OVERWRITE_AA));
    assert_good(&k.exec(&n, &[0x00; 6], &[]));
    // Unrestricted completion mode (AUSE=1): EXIT FAILURE MODE leaves it.
    k.dev.fail_writes.store(true, Ordering::Relaxed);
    let r = k.exec(&n, &sanitize_overwrite_cdb(false, true), &OVERWRITE_AA);
    assert_eq!(sense_of(&r), (0x03, 0x31, 0x03));
    assert_eq!(sense_of(&k.exec(&n, &[0x00; 6], &[])), (0x03, 0x31, 0x03));
    k.dev.fail_writes.store(false, Ordering::Relaxed);
    assert_good(&k.exec(&n, &exit, &[]));
    assert_good(&k.exec(&n, &[0x00; 6], &[]));
    // Outside the failed state EXIT FAILURE MODE has nothing to do.
    assert_good(&k.exec(&n, &exit, &[]));
}

#[test]
fn sanitize_block_erase_deallocates_everything() {
    let k = sanitize_kit(0);
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write10(0, 4), &[b'a'; 4 * 512]));
    assert_good(&k.exec(&n, &[0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], &[]));
    assert_eq!(k.dev.snapshot(0, 4 * 512), vec![0; 4 * 512]);
    let mut gls = vec![0x9E, 0x12];
    gls.extend_from_slice(&0u64.to_be_bytes());
    gls.extend_from_slice(&[0, 0, 0, 24, 0, 0]);
    let r = k.exec(&n, &gls, &[]);
    assert_eq!(&r.data_in[16..20], &(BLOCKS as u32).to_be_bytes());
    assert_eq!(r.data_in[20], 0x01, "deallocated");
    // A read after block erase completes with GOOD (WABEREQ 01b).
    assert_good(&k.exec(&n, &read10(0, 1), &[]));
}

#[test]
fn sanitize_overwrite_with_invert_ends_with_the_pattern() {
    let k = sanitize_kit(0);
    let n = k.ready("i1");
    // INVERT, two passes: inverted first, then the pattern.
    let p = [0x80 | 0x02, 0, 0, 4, 0x0F, 0x0F, 0x0F, 0x0F];
    assert_good(&k.exec(&n, &sanitize_overwrite_cdb(false, false), &p));
    assert_eq!(k.dev.snapshot(0, 512), vec![0x0F; 512]);
}

#[test]
fn sanitize_waits_out_a_transitioning_device() {
    let k = sanitize_kit(0);
    let n = k.ready("i1");
    k.dev.transitioning_writes.store(3, Ordering::Relaxed);
    assert_good(&k.exec(&n, &sanitize_overwrite_cdb(false, false), &OVERWRITE_AA));
    assert_eq!(k.dev.transitioning_writes.load(Ordering::Relaxed), 0);
    assert_eq!(k.dev.snapshot(0, 512), vec![0xAA; 512]);
}

#[test]
fn flush_all_flushes_every_unit() {
    let k = Kit::new();
    let other = Arc::new(MemDevice::new(64 * 512));
    k.target
        .add_lun(1, LuConfig::default(), other.clone())
        .unwrap();
    let before = k.dev.flushes.load(Ordering::Relaxed);
    k.target.flush_all();
    assert_eq!(k.dev.flushes.load(Ordering::Relaxed), before + 1);
    assert_eq!(other.flushes.load(Ordering::Relaxed), 1);
}

#[test]
fn preempt_and_abort_names_the_preempted_nexuses() {
    let k = Kit::new();
    let a = k.ready("a");
    let b = k.ready("b");
    let c = k.ready("c");
    assert_good(&pr(&k, &a, 0x06, 0, 0, 0xA));
    assert_good(&pr(&k, &b, 0x06, 0, 0, 0xB));
    assert_good(&pr(&k, &c, 0x06, 0, 0, 0xC));
    assert_good(&pr(&k, &a, 0x01, 1, 0xA, 0));
    // PREEMPT (without abort) names nobody.
    assert_good(&pr(&k, &b, 0x04, 1, 0xB, 0xC));
    assert!(k.target.take_preempted_nexuses().is_empty());
    // PREEMPT AND ABORT of the holder names it, once.
    assert_good(&pr(&k, &b, 0x05, 1, 0xB, 0xA));
    assert_eq!(
        k.target.take_preempted_nexuses(),
        vec![Preempted {
            lun: 0,
            nexus: a.clone()
        }]
    );
    assert!(k.target.take_preempted_nexuses().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn execute_never_panics(cdb in proptest::collection::vec(any::<u8>(), 0..20),
                            data in proptest::collection::vec(any::<u8>(), 0..1100),
                            opcode in proptest::sample::select(crate::commands::COMMANDS.iter().map(|c| c.opcode).collect::<Vec<_>>()),
                            use_known in any::<bool>(),
                            lun in 0u64..3) {
        let dev = Arc::new(MemDevice::new(64 * 512));
        let target = TargetDevice::new();
        target.add_lun(0, LuConfig::default(), dev).unwrap();
        let n = nexus("fuzz");
        let mut cdb = cdb;
        if use_known && !cdb.is_empty() {
            cdb[0] = opcode;
        }
        for _ in 0..2 {
            let data = Bytes::from(data.clone());
            let req = ScsiRequest { nexus: &n, lun, cdb: &cdb, data_out: &data, expected_data_in_len: 4096, attr: TaskAttribute::Simple, arrived: std::time::Instant::now() };
            let r = target.execute(&req);
            if r.status == ScsiStatus::CheckCondition {
                prop_assert!(r.sense.is_some());
            }
            let _ = target.data_out_len(lun, &cdb);
        }
    }
}

/// A nexus through relative port `port` of target port group `group`.
fn nexus_via(name: &str, group: u16, port: u16) -> ItNexus {
    let mut n = nexus(name);
    n.target_port.group = group;
    n.target_port.relative_id = port;
    n.target_port.name = format!("iqn.2024-01.test:t,t,0x{port:04x}");
    n
}

fn groups(states: &[(u16, alua::AsymmetricAccessState)]) -> Vec<alua::TargetPortGroup> {
    states
        .iter()
        .map(|(id, state)| alua::TargetPortGroup {
            id: *id,
            state: *state,
            preferred: false,
            ports: vec![*id],
        })
        .collect()
}

#[test]
fn target_port_groups_gate_commands_and_announce_their_changes() {
    use alua::AsymmetricAccessState::*;
    let k = Kit::new();
    k.target
        .set_port_groups(groups(&[(1, ActiveOptimized), (2, Standby)]));
    let a = k.ready("a");
    let b = nexus_via("b", 2, 2);
    let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    // Explicit ALUA is offered once a cluster publishes groups.
    let inq = k.exec(&a, &[0x12, 0, 0, 0, 96, 0], &[]);
    assert_eq!(
        (inq.data_in[5] >> 4) & 0x03,
        0x03,
        "TPGS implicit and explicit"
    );
    // REPORT TARGET PORT GROUPS lists both, with their states and ports.
    let r = k.exec(&a, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_good(&r);
    let d = &r.data_in;
    assert_eq!(u32::from_be_bytes([d[0], d[1], d[2], d[3]]), 24);
    assert_eq!((d[4] & 0x0F, u16::from_be_bytes([d[6], d[7]])), (0x0, 1));
    assert_eq!((d[16] & 0x0F, u16::from_be_bytes([d[18], d[19]])), (0x2, 2));
    assert_eq!(
        (d[11], u16::from_be_bytes([d[14], d[15]])),
        (1, 1),
        "one port, id 1"
    );

    // Through the standby group: reads refused, persistent reservations answered.
    let _ = k.exec(&b, &[0x00, 0, 0, 0, 0, 0], &[]); // power-on unit attention
    assert_eq!(sense_of(&k.exec(&b, &read10, &[])), (0x02, 0x04, 0x0B));
    assert_good(&k.exec(&b, &[0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]));
    assert_good(&k.exec(&a, &read10, &[]));

    // A failover: group 1 transitions, group 2 becomes active/optimized. Every nexus
    // hears it once, then the new states hold.
    k.target
        .set_port_groups(groups(&[(1, Transitioning), (2, ActiveOptimized)]));
    for n in [&a, &b] {
        assert_eq!(sense_of(&k.exec(n, &read10, &[])), (0x06, 0x2A, 0x06));
    }
    assert_eq!(sense_of(&k.exec(&a, &read10, &[])), (0x02, 0x04, 0x0A));
    assert_good(&k.exec(&b, &read10, &[]));
    // Publishing the same states again announces nothing.
    k.target
        .set_port_groups(groups(&[(1, Transitioning), (2, ActiveOptimized)]));
    assert_good(&k.exec(&b, &read10, &[]));

    // SET TARGET PORT GROUPS is checked, then queued for the cluster.
    let stpg = |list: &[u8]| {
        let mut cdb = vec![0xA4, 0x0A, 0, 0, 0, 0];
        cdb.extend_from_slice(&(list.len() as u32).to_be_bytes());
        cdb.extend_from_slice(&[0, 0]);
        k.exec(&b, &cdb, list)
    };
    assert_good(&stpg(&[0, 0, 0, 0, 0x00, 0, 0, 1]));
    let asked = k.target.take_alua_requests();
    assert_eq!(asked.len(), 1);
    assert_eq!((asked[0].group, asked[0].state), (1, ActiveOptimized));
    assert_eq!(asked[0].by, b);
    assert_eq!(
        sense_of(&stpg(&[0, 0, 0, 0, 0x00, 0, 0, 7])),
        (0x05, 0x26, 0x00),
        "an unknown group"
    );
    assert!(k.target.take_alua_requests().is_empty());
}

/// Forwards to another target device in the same process, as the cluster does over
/// the replication link.
#[derive(Debug)]
struct ToDevice(Arc<TargetDevice>);

impl Forwarder for ToDevice {
    fn execute(&self, cmd: ForwardedCommand, respond: Responder) {
        self.0.execute_then(&cmd.request(), respond);
    }
    fn task_management(&self, tmf: ForwardedTaskManagement) {
        self.0.apply_task_management(&tmf);
    }
}

fn nexus_on(name: &str, port: u16) -> ItNexus {
    let mut n = nexus(name);
    n.target_port = TargetPort {
        name: format!("iqn.2024-01.test:t,t,0x{port:04x}"),
        relative_id: port,
        group: port,
    };
    n
}

#[test]
fn a_forwarding_device_shares_reservations_and_reports_its_own_port() {
    let primary = Arc::new(TargetDevice::new());
    primary
        .add_lun(
            0,
            LuConfig::default(),
            Arc::new(MemDevice::new(BLOCKS * 512)),
        )
        .unwrap();
    use alua::AsymmetricAccessState::*;
    primary.set_port_groups(groups(&[(1, ActiveOptimized), (2, ActiveNonOptimized)]));
    let other = Kit {
        target: TargetDevice::new(),
        dev: Arc::new(MemDevice::new(512)),
    };
    other
        .target
        .forward_to(Arc::new(ToDevice(primary.clone())), [(0, 512)].into());
    assert!(other.target.is_forwarding());
    assert_eq!(other.target.luns(), vec![0]);
    assert_eq!(other.target.data_out_len(0, &write10(0, 2)), Some(1024));
    let a = nexus_on("iqn.a", 1);
    let b = nexus_on("iqn.b", 2);
    // Both nexuses live on the primary's logical unit, whichever path they use.
    let exec_a = |cdb: &[u8], data: &[u8]| {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        primary.execute(&ScsiRequest {
            nexus: &a,
            lun: 0,
            cdb: &c,
            data_out: &Bytes::copy_from_slice(data),
            expected_data_in_len: 1 << 20,
            attr: TaskAttribute::Simple,
            arrived: std::time::Instant::now(),
        })
    };
    assert_eq!(sense_of(&exec_a(&[0; 6], &[])).1, 0x29);
    assert_eq!(sense_of(&other.exec(&b, &[0; 6], &[])).1, 0x29);
    // VPD 0x83 through the forwarded path names the port it arrived on.
    let r = other.exec(&b, &[0x12, 1, 0x83, 0, 255, 0], &[]);
    assert_good(&r);
    let d = &r.data_in;
    let tpg = d
        .windows(8)
        .any(|w| w[0] & 0x0F == 1 && w[1] & 0x0F == 5 && w[6..8] == [0, 2]);
    assert!(tpg, "target port group 2 designator in {d:?}");
    // Registration and reservation through the primary; conflicts through the other path.
    let (c, p) = prout(0, 0, 0, 0xA, 0);
    assert_good(&exec_a(&c, &p));
    let (c, p) = prout(1, 3, 0xA, 0, 0);
    assert_good(&exec_a(&c, &p));
    assert_eq!(
        other.exec(&b, &read10(1, 1), &[]).status,
        ScsiStatus::ReservationConflict
    );
    // READ RESERVATION through the other path sees it.
    let r = other.exec(&b, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0], &[]);
    assert_good(&r);
    assert_eq!(&r.data_in[8..16], &0xAu64.to_be_bytes());
    assert_eq!(r.data_in[21], 3);
    // Writes through the forwarded path land on the primary's medium.
    let (c, p) = prout(2, 3, 0xA, 0, 0);
    assert_good(&exec_a(&c, &p));
    assert_good(&other.exec(&b, &write10(7, 1), &[0x5A; 512]));
    let r = exec_a(&read10(7, 1), &[]);
    assert_eq!(&r.data_in[..], &[0x5A; 512][..]);
    // A LOGICAL UNIT RESET through the other path resets the primary's unit.
    other.target.reset(ResetKind::LogicalUnit, Some(0), &b);
    assert_eq!(sense_of(&exec_a(&read10(1, 1), &[])), (0x06, 0x29, 0x03));
}

/// A shared reservation store in memory that can be told to refuse.
#[derive(Debug, Default)]
struct MemStore {
    state: std::sync::Mutex<Option<String>>,
    refuse: std::sync::atomic::AtomicBool,
    saves: std::sync::atomic::AtomicUsize,
}

impl ReservationStore for MemStore {
    fn load(&self) -> Option<String> {
        self.state.lock().unwrap().clone()
    }
    fn save(&self, state: &str) -> std::io::Result<()> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("no quorum"));
        }
        self.saves.fetch_add(1, Ordering::SeqCst);
        *self.state.lock().unwrap() = Some(state.to_string());
        Ok(())
    }
}

#[test]
fn shared_reservations_are_saved_before_completion_and_survive_a_takeover() {
    let store = Arc::new(MemStore::default());
    let first = TargetDevice::new();
    first
        .add_shared_lun(
            0,
            LuConfig::default(),
            Arc::new(MemDevice::new(BLOCKS * 512)),
            Some(store.clone()),
        )
        .unwrap();
    let k = Kit {
        target: first,
        dev: Arc::new(MemDevice::new(512)),
    };
    let a = k.ready("iqn.a");
    let b = k.ready("iqn.b");
    assert_good(&pr(&k, &a, 0, 0, 0, 0xA));
    assert_good(&pr(&k, &a, 1, 5, 0xA, 0));
    assert_eq!(store.saves.load(Ordering::SeqCst), 2);
    // A change the store refuses did not happen.
    store.refuse.store(true, Ordering::SeqCst);
    assert_eq!(sense_of(&pr(&k, &b, 0, 0, 0, 0xB)), (0x02, 0x04, 0x0A));
    store.refuse.store(false, Ordering::SeqCst);
    assert!(!can_write(&k, &b), "b's registration was undone");
    // Another node takes over with the same store: same registrations and reservation;
    // a registered nexus is told the access state changed, not that power came on, and
    // an unregistered one gets the power on a fresh unit gives.
    let second = TargetDevice::new();
    second.take_over();
    second
        .add_shared_lun(
            0,
            LuConfig::default(),
            Arc::new(MemDevice::new(BLOCKS * 512)),
            Some(store.clone()),
        )
        .unwrap();
    let k2 = Kit {
        target: second,
        dev: Arc::new(MemDevice::new(512)),
    };
    assert_eq!(
        sense_of(&k2.exec(&a, &read10(1, 1), &[])),
        (0x06, 0x2A, 0x06)
    );
    assert_eq!(
        sense_of(&k2.exec(&b, &read10(1, 1), &[])),
        (0x06, 0x29, 0x00)
    );
    assert!(can_write(&k2, &a));
    assert!(!can_write(&k2, &b));
    let r = k2.exec(&a, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0], &[]);
    assert_eq!(&r.data_in[8..16], &0xAu64.to_be_bytes());
    assert_eq!(r.data_in[21], 5);
}

/// Records what a device tells the other nodes' paths.
#[derive(Debug, Default)]
struct Paths(std::sync::Mutex<Vec<String>>);

impl RemotePaths for Paths {
    fn cold_reset(&self, by: &ItNexus) {
        self.0
            .lock()
            .unwrap()
            .push(format!("cold reset by {}", by.initiator_name));
    }
    fn preempted(&self, lun: u64, nexus: &ItNexus) {
        self.0
            .lock()
            .unwrap()
            .push(format!("preempted {} on {lun}", nexus.initiator_name));
    }
}

#[test]
fn preempt_and_abort_and_cold_resets_reach_the_other_nodes_paths() {
    let k = Kit::new();
    let paths = Arc::new(Paths::default());
    k.target.set_remote_paths(paths.clone());
    let a = k.ready("iqn.a");
    let b = k.ready("iqn.b");
    assert_good(&pr(&k, &a, 0, 0, 0, 0xA));
    assert_good(&pr(&k, &b, 0, 0, 0, 0xB));
    assert_good(&pr(&k, &a, 1, 1, 0xA, 0));
    // PREEMPT AND ABORT of b's key by a.
    assert_good(&pr(&k, &a, 5, 1, 0xA, 0xB));
    let taken = k.target.take_preempted_nexuses();
    assert_eq!(taken.len(), 1);
    k.target.reset(ResetKind::TargetWarm, None, &a);
    k.target.reset(ResetKind::TargetCold, None, &a);
    assert_eq!(
        *paths.0.lock().unwrap(),
        vec![
            "preempted iqn.b on 0".to_string(),
            "cold reset by iqn.a".to_string()
        ]
    );
}

/// `try_execute_cached` answers a small READ of data in memory at once, and gives
/// anything else back unanswered, with nothing done.
#[test]
fn only_a_small_read_of_data_in_memory_is_answered_without_waiting() {
    let k = Kit::new();
    let n = k.ready("i1");
    assert_good(&k.exec(&n, &write16(8, 2, 0), &[0x5A; 1024]));
    let (tx, rx) = std::sync::mpsc::channel::<ScsiResponse>();
    let try_cached = |n: &ItNexus, cdb: &[u8]| {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let data = Bytes::new();
        let req = ScsiRequest {
            nexus: n,
            lun: 0,
            cdb: &c,
            data_out: &data,
            expected_data_in_len: 1 << 20,
            attr: TaskAttribute::Simple,
            arrived: std::time::Instant::now(),
        };
        let tx = tx.clone();
        let respond = Responder::new(move |r| tx.send(r).unwrap());
        k.target.try_execute_cached(&req, respond)
    };

    // In memory: answered here, with the data.
    assert!(try_cached(&n, &read16(8, 2)).is_ok());
    let r = rx.try_recv().expect("answered at once");
    assert_good(&r);
    assert_eq!(&r.data_in[..], &[0x5A; 1024][..]);

    // A write, a read larger than what is copied on the caller's thread, a read the
    // device would have to wait for (here it fails): given back, unanswered.
    let large = u32::try_from(crate::sbc::CACHED_READ_MAX / 512 + 1).unwrap();
    for (what, cdb) in [
        ("write", write16(0, 1, 0)),
        ("large read", read16(0, large)),
        ("read from the disk", read16(8, 2)),
    ] {
        if what == "read from the disk" {
            k.dev.fail_reads.store(true, Ordering::Relaxed);
        }
        let back = try_cached(&n, &cdb).expect_err(what);
        assert!(rx.try_recv().is_err(), "{what}: answered");
        // Run where it may wait, the command does what it says.
        back.send(k.exec(&n, &cdb, &[0x11; 512]));
        let r = rx.try_recv().unwrap();
        match what {
            "read from the disk" => assert_eq!(sense_of(&r), (0x03, 0x11, 0)),
            _ => assert_good(&r),
        }
    }
    k.dev.fail_reads.store(false, Ordering::Relaxed);
    assert_eq!(
        &k.exec(&n, &read16(0, 1), &[]).data_in[..],
        &[0x11; 512][..]
    );

    // A pending unit attention is the answer, whatever the data: nothing to wait for.
    k.dev.fail_reads.store(true, Ordering::Relaxed);
    assert!(try_cached(&nexus("i2"), &read16(8, 2)).is_ok());
    assert_eq!(sense_of(&rx.try_recv().unwrap()), (0x06, 0x29, 0x00));
}
