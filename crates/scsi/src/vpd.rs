//! Standard INQUIRY data and vital product data pages (SPC-4 §6.4, §7.8; SBC-3 §6.6).

use crate::cdb::put;
use crate::lu::LogicalUnit;
use crate::sbc::limits;
use crate::TargetPort;

/// Version descriptors claimed in standard INQUIRY data (SPC-4 Table 142).
const VERSION_DESCRIPTORS: [u16; 4] = [
    0x00A0, // SAM-5 (no version claimed)
    0x0960, // iSCSI (no version claimed)
    0x0460, // SPC-4 (no version claimed)
    0x04C0, // SBC-3 (no version claimed)
];

/// VPD pages this target returns, in ascending order (SPC-4 §7.8.1).
pub(crate) const SUPPORTED_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

fn ascii_field(buf: &mut [u8], off: usize, len: usize, s: &str) {
    for (i, slot) in buf.iter_mut().skip(off).take(len).enumerate() {
        *slot = match s.as_bytes().get(i) {
            Some(&c) if (0x20..=0x7E).contains(&c) => c,
            Some(_) => b'?',
            None => b' ',
        };
    }
}

/// Standard INQUIRY data (SPC-4 §6.4.2), 96 bytes. TPGS says implicit ALUA, and
/// explicit too when `explicit_alua`.
pub(crate) fn standard_inquiry(lu: &LogicalUnit, explicit_alua: bool) -> Vec<u8> {
    let mut b = vec![0u8; 96];
    put(
        &mut b,
        0,
        &[
            0x00, // peripheral qualifier 0, direct access block device
            0x00, // RMB = 0: not removable
            0x06, // VERSION: SPC-4
            0x12, // HISUP, response data format 2
            0,    // additional length below
            0x18, // TPGS = 01b (implicit ALUA; 11b below with explicit), 3PC
            0x10, // MULTIP: the unit is reachable through several ports
            0x02, // CMDQUE
        ],
    );
    ascii_field(&mut b, 8, 8, &lu.config.vendor);
    ascii_field(&mut b, 16, 16, &lu.config.product);
    ascii_field(&mut b, 32, 4, &lu.config.revision);
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        put(&mut b, 58 + 2 * i, &v.to_be_bytes());
    }
    put(&mut b, 4, &[95 - 4]);
    if let Some(flags) = b.get_mut(5).filter(|_| explicit_alua) {
        *flags |= 0x20;
    }
    b
}

/// Standard INQUIRY data for a LUN without a logical unit: peripheral qualifier 011b,
/// device type 1Fh (SPC-4 §6.4.2).
pub(crate) fn standard_inquiry_no_lu() -> Vec<u8> {
    let mut b = vec![0u8; 36];
    put(&mut b, 0, &[0x7F, 0x00, 0x06, 0x12, 31]);
    b
}

fn page(code: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&[0x00, code]);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(body);
    b
}

/// Builds VPD page `code`; `None` for an unsupported page.
pub(crate) fn vpd_page(lu: &LogicalUnit, port: &TargetPort, code: u8) -> Option<Vec<u8>> {
    Some(match code {
        0x00 => page(0x00, &SUPPORTED_PAGES),
        0x80 => page(0x80, lu.config.serial.as_bytes()),
        0x83 => page(0x83, &device_identification(lu, port)),
        0xB0 => page(0xB0, &block_limits(lu)),
        0xB1 => page(0xB1, &block_device_characteristics(lu)),
        0xB2 => page(0xB2, &logical_block_provisioning(lu)),
        _ => return None,
    })
}

fn designator(out: &mut Vec<u8>, code_set_proto: u8, piv_assoc_type: u8, value: &[u8]) {
    let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
    out.extend_from_slice(&[code_set_proto, piv_assoc_type, 0, len]);
    out.extend_from_slice(value.get(..usize::from(len)).unwrap_or(value));
}

/// A UTF-8 SCSI name string: null terminated and padded to a multiple of 4 (SPC-4
/// §7.8.6.11).
fn name_string(name: &str) -> Vec<u8> {
    let mut v: Vec<u8> = name.bytes().take(251).collect();
    v.push(0);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

/// Device identification VPD page body (SPC-4 §7.8.6).
fn device_identification(lu: &LogicalUnit, port: &TargetPort) -> Vec<u8> {
    const ISCSI: u8 = 0x50; // protocol identifier 5h in bits 7..4
    let mut d = Vec::with_capacity(128);
    // Logical unit: NAA IEEE Registered Extended, binary.
    designator(&mut d, 0x01, 0x03, &lu.config.naa);
    // Logical unit: T10 vendor ID based, ASCII: vendor (8 bytes) + serial number.
    let mut t10 = vec![b' '; 8];
    ascii_field(&mut t10, 0, 8, &lu.config.vendor);
    t10.extend(
        lu.config
            .serial
            .bytes()
            .filter(|c| (0x20..=0x7E).contains(c))
            .take(200),
    );
    designator(&mut d, 0x02, 0x01, &t10);
    // Target port: relative target port identifier.
    let mut rel = [0u8; 4];
    put(&mut rel, 2, &port.relative_id.to_be_bytes());
    designator(&mut d, ISCSI | 0x01, 0x80 | 0x10 | 0x04, &rel);
    // Target port: target port group.
    let mut tpg = [0u8; 4];
    put(&mut tpg, 2, &port.group.to_be_bytes());
    designator(&mut d, ISCSI | 0x01, 0x80 | 0x10 | 0x05, &tpg);
    // Target port: SCSI name string of the port.
    designator(
        &mut d,
        ISCSI | 0x03,
        0x80 | 0x10 | 0x08,
        &name_string(&port.name),
    );
    // Target device: SCSI name string (the iSCSI name without the ",t,0x" suffix).
    let device_name = port.name.split(",t,").next().unwrap_or(&port.name);
    designator(
        &mut d,
        ISCSI | 0x03,
        0x80 | 0x20 | 0x08,
        &name_string(device_name),
    );
    d
}

/// Block limits VPD page body (SBC-3 §6.6.4), page length 3Ch.
fn block_limits(lu: &LogicalUnit) -> Vec<u8> {
    let bs = lu.block_size();
    let thin = lu.device.supports_discard();
    let mut b = vec![0u8; 0x3C];
    // byte 4 (here 0): WSNZ = 0, a zero WRITE SAME length means "to the end".
    put(&mut b, 1, &[limits::MAX_COMPARE_AND_WRITE_BLOCKS]);
    put(&mut b, 2, &1u16.to_be_bytes()); // optimal transfer length granularity
    put(&mut b, 4, &limits::max_transfer_blocks(bs).to_be_bytes());
    put(
        &mut b,
        8,
        &limits::optimal_transfer_blocks(bs).to_be_bytes(),
    );
    put(&mut b, 12, &limits::max_transfer_blocks(bs).to_be_bytes()); // max prefetch
    if thin {
        put(&mut b, 16, &limits::MAX_UNMAP_LBA_COUNT.to_be_bytes());
        put(&mut b, 20, &limits::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        // Optimal unmap granularity: one physical block (holes are punched in pages).
        let granularity = 1u32 << crate::sbc::physical_block_exponent(lu);
        put(&mut b, 24, &granularity.to_be_bytes());
        put(&mut b, 28, &0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    }
    put(
        &mut b,
        32,
        &u64::from(limits::max_write_same_blocks(bs)).to_be_bytes(),
    );
    put(&mut b, 40, &limits::max_atomic_blocks(bs).to_be_bytes());
    put(&mut b, 44, &1u32.to_be_bytes()); // atomic alignment
    put(&mut b, 48, &1u32.to_be_bytes()); // atomic transfer length granularity
    b
}

/// Block device characteristics VPD page body (SBC-3 §6.6.2).
fn block_device_characteristics(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    put(&mut b, 0, &1u16.to_be_bytes()); // MEDIUM ROTATION RATE 0001h: non-rotating
                                         // Byte 7 of the page: WABEREQ 01b where SANITIZE BLOCK ERASE is implemented (a thin
                                         // unit): after it a read completes with GOOD status, the blocks deallocated and
                                         // reading as zeroes. 00b otherwise. WACEREQ stays 00b: CRYPTOGRAPHIC ERASE is not
                                         // supported.
    if lu.device.supports_discard() {
        put(&mut b, 3, &[0x40]);
    }
    b
}

/// Logical block provisioning VPD page body (SBC-3 §6.6.5).
fn logical_block_provisioning(lu: &LogicalUnit) -> Vec<u8> {
    let thin = lu.device.supports_discard();
    let mut b = vec![0u8; 4];
    if thin {
        // LBPU, LBPWS, LBPWS10, LBPRZ (deallocated blocks read as zeroes).
        put(&mut b, 1, &[0x80 | 0x40 | 0x20 | 0x04, 0x02]); // provisioning type 010b: thin
    } else {
        // Fully provisioned: no unmapping; deallocation would be zero writes anyway.
        put(&mut b, 1, &[0x00, 0x00]);
    }
    b
}
