//! The file's layout: its tables and bookkeeping keys, record keys `(stream, sequence)`, and
//! how a record is encoded (format 2, with the odometer reading) and decoded (formats 1 and 2).
//! Also the uptime odometer whose readings the records carry.

use redb::TableDefinition;

use super::NewRecord;

pub(super) const RECORDS: TableDefinition<u128, &[u8]> = TableDefinition::new("records");
pub(super) const STREAMS: TableDefinition<&str, u32> = TableDefinition::new("streams");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const TEXT: TableDefinition<&str, &str> = TableDefinition::new("text");

pub(super) const NEXT_SEQ: &str = "next_seq";
pub(super) const NEXT_STREAM: &str = "next_stream";
pub(super) const ENQUEUED: &str = "enqueued_total";
pub(super) const DELIVERED: &str = "delivered_total";
/// The first sequence written with an odometer reading (format 2). Records below it were
/// written by a version without one (format 1).
pub(super) const FORMAT2_FROM: &str = "format2_from_seq";
/// The odometer reading format-1 records are aged from: when this version first opened the
/// file, so that an upgrade never drops a backlog.
pub(super) const LEGACY_ODO: &str = "format1_odometer_ms";
/// The odometer's base: in boot `ODO_BOOT`, the monotonic clock read `ODO_MONO` when the
/// odometer read `ODO_VALUE`.
pub(super) const ODO_MONO: &str = "odometer_mono_ms";
pub(super) const ODO_VALUE: &str = "odometer_ms";
pub(super) const ODO_BOOT: &str = "odometer_boot_id";

/// Per-record overhead counted against the byte limit (key and bookkeeping).
pub(super) const RECORD_OVERHEAD: u64 = 16;
/// Bytes of a record's header: time, priority, flags, odometer, topic length.
pub(super) const HEADER: usize = 20;

/// Uptime summed across boots: `odo_at` when the monotonic clock read `mono_at` (this boot).
#[derive(Debug, Clone, Copy)]
pub(super) struct Odometer {
    pub(super) mono_at: u64,
    pub(super) odo_at: u64,
}

impl Odometer {
    pub(super) fn at(&self, mono_ms: u64) -> u64 {
        self.odo_at
            .saturating_add(mono_ms.saturating_sub(self.mono_at))
    }
}

/// How to read a stored value: format 1 (no odometer) below `v2_from`, format 2 from it on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Format {
    pub(super) v2_from: u64,
    pub(super) legacy_odo: u64,
}

/// A stored value, decoded.
pub(super) struct Decoded<'a> {
    pub(super) ts_ms: u64,
    pub(super) priority: u8,
    /// The wall clock was plausible when the record was accepted (format 1: assumed).
    pub(super) wall_plausible: bool,
    pub(super) odo_ms: u64,
    pub(super) topic: &'a str,
    pub(super) payload: &'a [u8],
}

impl Format {
    pub(super) fn decode<'a>(&self, seq: u64, v: &'a [u8]) -> Option<Decoded<'a>> {
        if seq >= self.v2_from {
            decode_v2(v)
        } else {
            decode_v1(v).map(|(ts_ms, priority, topic, payload)| Decoded {
                ts_ms,
                priority,
                wall_plausible: true,
                odo_ms: self.legacy_odo,
                topic,
                payload,
            })
        }
    }

    pub(super) fn odo_of(&self, seq: u64, v: &[u8]) -> u64 {
        self.decode(seq, v).map_or(self.legacy_odo, |d| d.odo_ms)
    }
}

pub(super) fn key(stream: u32, seq: u64) -> u128 {
    (u128::from(stream) << 64) | u128::from(seq)
}

pub(super) fn seq_of(key: u128) -> u64 {
    // The low 64 bits are the sequence by construction.
    (key & u128::from(u64::MAX)) as u64
}

/// Format 2: `ts_ms u64 | priority u8 | flags u8 (bit 0: wall clock plausible) | odometer u64 |
/// topic length u16 | topic | payload`, little-endian.
pub(super) fn encode(ts_ms: u64, odo_ms: u64, wall_plausible: bool, r: &NewRecord) -> Vec<u8> {
    let topic = r.topic.as_bytes();
    let topic_len = topic.len().min(u16::MAX as usize);
    let mut v = Vec::with_capacity(HEADER + topic_len + r.payload.len());
    v.extend_from_slice(&ts_ms.to_le_bytes());
    v.push(r.priority);
    v.push(u8::from(wall_plausible));
    v.extend_from_slice(&odo_ms.to_le_bytes());
    v.extend_from_slice(&(topic_len as u16).to_le_bytes());
    v.extend_from_slice(&topic[..topic_len]);
    v.extend_from_slice(&r.payload);
    v
}

fn decode_v2(v: &[u8]) -> Option<Decoded<'_>> {
    let ts_ms = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let priority = *v.get(8)?;
    let flags = *v.get(9)?;
    let odo_ms = u64::from_le_bytes(v.get(10..18)?.try_into().ok()?);
    let topic_len = u16::from_le_bytes(v.get(18..20)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(v.get(HEADER..HEADER + topic_len)?).ok()?;
    Some(Decoded {
        ts_ms,
        priority,
        wall_plausible: flags & 1 == 1,
        odo_ms,
        topic,
        payload: v.get(HEADER + topic_len..)?,
    })
}

/// Format 1 (before the odometer): `ts_ms u64 | priority u8 | topic length u16 | topic |
/// payload`. `(ts_ms, priority, topic, payload)`, or `None` for bytes it did not write.
fn decode_v1(v: &[u8]) -> Option<(u64, u8, &str, &[u8])> {
    let ts = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let priority = *v.get(8)?;
    let topic_len = u16::from_le_bytes(v.get(9..11)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(v.get(11..11 + topic_len)?).ok()?;
    Some((ts, priority, topic, v.get(11 + topic_len..)?))
}

pub(super) fn record_size(value_len: usize) -> u64 {
    value_len as u64 + RECORD_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::super::testing::rec;
    use super::*;

    #[test]
    fn decode_refuses_bytes_it_did_not_write() {
        assert!(decode_v2(&[1, 2, 3]).is_none());
        assert!(decode_v1(&[1, 2, 3]).is_none());
        let v = encode(7, 99, false, &rec("a", 3, 1));
        let d = decode_v2(&v).unwrap();
        assert_eq!(
            (d.ts_ms, d.priority, d.wall_plausible, d.odo_ms, d.topic),
            (7, 3, false, 99, "modules/m/outputs/x")
        );
        assert_eq!(d.payload.len(), 200);
        assert!(decode_v2(&v[..HEADER + 2]).is_none());
    }
}
