//! Packets on the wire: one read whole (rumqttc's MQTT 3.1.1 codec, with a size bound), one
//! written within the write timeout, and a packet's kind for messages.

use bytes::BytesMut;
use rumqttc::Packet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{MAX_PACKET, Stream, WRITE_TIMEOUT};

pub(super) async fn read_packet<S: Stream>(
    stream: &mut S,
    input: &mut BytesMut,
    max: usize,
) -> Result<Packet, String> {
    loop {
        match Packet::read(input, max) {
            Ok(p) => return Ok(p),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("bad packet: {e}")),
        }
        if stream.read_buf(input).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
    }
}

pub(super) async fn write<S: Stream>(
    stream: &mut S,
    output: &mut BytesMut,
    p: Packet,
) -> Result<(), String> {
    output.clear();
    p.write(output, MAX_PACKET).map_err(|e| e.to_string())?;
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(output))
        .await
        .map_err(|_| "the module stopped reading".to_string())?
        .map_err(|e| e.to_string())
}

pub(super) fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => "QoS 2 flow",
        Packet::SubAck(_) | Packet::UnsubAck(_) => "SUBACK/UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "other",
    }
}
