//! The few MQTT 3.1.1 and 5 packets the front door reads or writes itself: framing, CONNECT
//! (to learn the protocol level and client id, and to rename the client towards the embedded
//! broker), PUBLISH (to keep the record) and the acknowledgements it sends. Everything else
//! passes through as framed bytes.
//!
//! Invariant: whatever the bytes, nothing here panics, reads out of bounds or allocates more
//! than the frame it was given; a packet it cannot decode is an error that closes its
//! connection, never a guess.

use bytes::{Bytes, BytesMut};

/// Packet types (the high nibble of a packet's first byte).
pub mod kind {
    /// CONNECT.
    pub const CONNECT: u8 = 1;
    /// CONNACK.
    pub const CONNACK: u8 = 2;
    /// PUBLISH.
    pub const PUBLISH: u8 = 3;
    /// PUBACK.
    pub const PUBACK: u8 = 4;
    /// PUBREC.
    pub const PUBREC: u8 = 5;
    /// PUBREL.
    pub const PUBREL: u8 = 6;
    /// PUBCOMP.
    pub const PUBCOMP: u8 = 7;
    /// SUBSCRIBE.
    pub const SUBSCRIBE: u8 = 8;
    /// SUBACK.
    pub const SUBACK: u8 = 9;
    /// UNSUBSCRIBE.
    pub const UNSUBSCRIBE: u8 = 10;
    /// PINGREQ.
    pub const PINGREQ: u8 = 12;
    /// PINGRESP.
    pub const PINGRESP: u8 = 13;
    /// DISCONNECT.
    pub const DISCONNECT: u8 = 14;
}

/// A packet the front door cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    /// The remaining length is longer than 4 bytes.
    #[error("malformed remaining length")]
    Length,
    /// The packet is larger than allowed; the connection is closed.
    #[error("packet of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit (mqtt.max_payload_bytes plus room for the header).
        limit: usize,
    },
    /// A field runs past the end of its packet, or holds a value MQTT forbids.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// A whole packet cut from the stream: its first byte and the bytes after the fixed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Type and flags.
    pub byte1: u8,
    /// The packet as received, fixed header included (what is relayed).
    pub raw: Bytes,
    /// Where the variable header starts in `raw`.
    pub body_at: usize,
}

impl Frame {
    /// Its type.
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// Variable header and payload.
    pub fn body(&self) -> &[u8] {
        &self.raw[self.body_at..]
    }
}

/// Cuts the next whole packet off `buf`: `Ok(None)` when more bytes are needed.
pub fn next_frame(buf: &mut BytesMut, limit: usize) -> Result<Option<Frame>, MqttError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Ok(None);
        };
        len |= ((b & 0x7F) as usize) << (7 * (at - 1));
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err(MqttError::Length);
        }
    }
    if len > limit {
        return Err(MqttError::TooLarge { size: len, limit });
    }
    if buf.len() < at + len {
        buf.reserve(at + len - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        byte1,
        raw: buf.split_to(at + len).freeze(),
        body_at: at,
    }))
}

/// Writes an MQTT variable-length integer.
fn put_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

/// Reads an MQTT variable-length integer at `at`: (value, bytes).
fn get_length(bytes: &[u8], at: usize) -> Result<(usize, usize), MqttError> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *bytes.get(at + i).ok_or(MqttError::Malformed("length"))?;
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((len, i + 1));
        }
    }
    Err(MqttError::Length)
}

fn u16_at(bytes: &[u8], at: usize, what: &'static str) -> Result<u16, MqttError> {
    let b = bytes.get(at..at + 2).ok_or(MqttError::Malformed(what))?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

/// A length-prefixed string or binary field at `at`: (its bytes, where the next field starts).
fn field<'a>(
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
) -> Result<(&'a [u8], usize), MqttError> {
    let len = u16_at(bytes, at, what)? as usize;
    let v = bytes
        .get(at + 2..at + 2 + len)
        .ok_or(MqttError::Malformed(what))?;
    Ok((v, at + 2 + len))
}

/// What the front door needs of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// 4 for MQTT 3.1.1 (3 for 3.1), 5 for MQTT 5.
    pub level: u8,
    /// The client id, as sent (may be empty).
    pub client_id: String,
    /// Clean session (3.1.1) or clean start (5).
    pub clean: bool,
    /// Keep-alive in seconds (0: none).
    pub keep_alive: u16,
    /// User name, if given.
    pub username: Option<String>,
    /// Password, if given.
    pub password: Option<Vec<u8>>,
    /// The will message, if any.
    pub will: Option<Will>,
    /// Where the client id field starts in the frame's body, and where it ends.
    id_span: (usize, usize),
    /// Where the keep-alive sits in the frame's body.
    keep_alive_at: usize,
}

/// A CONNECT's will message: published by the server when the client vanishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Its topic (UTF-8).
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
}

impl Connect {
    /// Whether the client speaks MQTT 5.
    pub fn is_v5(&self) -> bool {
        self.level == 5
    }
}

/// Reads a CONNECT frame.
pub fn connect(frame: &Frame) -> Result<Connect, MqttError> {
    if frame.kind() != kind::CONNECT {
        return Err(MqttError::Malformed(
            "CONNECT: first packet is not a CONNECT",
        ));
    }
    let b = frame.body();
    let (name, at) = field(b, 0, "CONNECT protocol name")?;
    if name != b"MQTT" && name != b"MQIsdp" {
        return Err(MqttError::Malformed("CONNECT protocol name"));
    }
    let level = *b.get(at).ok_or(MqttError::Malformed("CONNECT level"))?;
    if !matches!(level, 3..=5) {
        return Err(MqttError::Malformed("CONNECT protocol level"));
    }
    // MQTT 3.1 is "MQIsdp" level 3; 3.1.1 and 5 are "MQTT" 4 and 5 (Mosquitto refuses a mix too).
    if (name == b"MQIsdp") != (level == 3) {
        return Err(MqttError::Malformed(
            "CONNECT protocol name and level do not match",
        ));
    }
    let flags = *b.get(at + 1).ok_or(MqttError::Malformed("CONNECT flags"))?;
    let keep_alive_at = at + 2;
    let keep_alive = u16_at(b, keep_alive_at, "CONNECT keep-alive")?;
    let mut at = at + 4;
    if level == 5 {
        let (props, n) = get_length(b, at)?;
        at += n + props;
    }
    let (id, end) = field(b, at, "CONNECT client id")?;
    let client_id = std::str::from_utf8(id)
        .map_err(|_| MqttError::Malformed("CONNECT client id (not UTF-8)"))?
        .to_owned();
    let mut next = end;
    let mut will = None;
    if flags & 0x04 != 0 {
        if level == 5 {
            let (props, n) = get_length(b, next)?;
            next += n + props;
        }
        let (topic, n) = field(b, next, "CONNECT will topic")?;
        let topic = std::str::from_utf8(topic)
            .map_err(|_| MqttError::Malformed("CONNECT will topic (not UTF-8)"))?
            .to_owned();
        let (payload, n) = field(b, n, "CONNECT will payload")?;
        will = Some(Will {
            topic,
            payload: Bytes::copy_from_slice(payload),
            qos: (flags >> 3) & 0x03,
        });
        next = n;
    }
    let mut username = None;
    if flags & 0x80 != 0 {
        let (u, n) = field(b, next, "CONNECT user name")?;
        username = Some(
            std::str::from_utf8(u)
                .map_err(|_| MqttError::Malformed("CONNECT user name (not UTF-8)"))?
                .to_owned(),
        );
        next = n;
    }
    let mut password = None;
    if flags & 0x40 != 0 {
        password = Some(field(b, next, "CONNECT password")?.0.to_vec());
    }
    Ok(Connect {
        level,
        client_id,
        clean: flags & 0x02 != 0,
        keep_alive,
        username,
        password,
        will,
        id_span: (at, end),
        keep_alive_at,
    })
}

/// The same CONNECT with its client id replaced by `id`, its keep-alive by `keep_alive`, a
/// clean session, no will and no login (the front door keeps wills itself, through the ACL,
/// and checks credentials itself; rumqttd would refuse a password that is not UTF-8); the rest
/// (MQTT 5 properties) byte for byte. What rumqttd refuses is made what it takes: a keep-alive
/// of 0 (none) becomes the longest ([`relay_keep_alive`]), and MQTT 3.1 ("MQIsdp", level 3)
/// goes as 3.1.1, the same packet otherwise.
pub fn rename_client(frame: &Frame, connect: &Connect, id: &str, keep_alive: u16) -> Bytes {
    let keep_alive = relay_keep_alive(keep_alive);
    let body = frame.body();
    let from = connect.id_span.0;
    let flags_at = connect.keep_alive_at - 1;
    let mut rest = Vec::with_capacity(body.len() + id.len() + 2);
    if connect.level == 3 {
        rest.extend_from_slice(b"\0\x04MQTT\x04");
    } else {
        rest.extend_from_slice(&body[..flags_at]);
    }
    // A clean session: the relay's id is used once. No will, user name or password.
    rest.push(0x02);
    let keep_alive = if keep_alive == 0 {
        u16::MAX
    } else {
        keep_alive
    };
    rest.extend_from_slice(&keep_alive.to_be_bytes());
    rest.extend_from_slice(&body[connect.keep_alive_at + 2..from]);
    rest.extend_from_slice(&(id.len() as u16).to_be_bytes());
    rest.extend_from_slice(id.as_bytes());
    let mut out = Vec::with_capacity(rest.len() + 5);
    out.push(frame.byte1);
    put_length(&mut out, rest.len());
    out.extend_from_slice(&rest);
    out.into()
}

/// The keep-alive a relay's CONNECT gets for a client's `keep_alive`: rumqttd refuses 0 (none),
/// so none becomes the longest.
pub fn relay_keep_alive(keep_alive: u16) -> u16 {
    if keep_alive == 0 {
        u16::MAX
    } else {
        keep_alive
    }
}

/// A QoS 0 PUBLISH of `payload` on `topic` (no properties), e.g. a will for local subscribers.
pub fn publish_qos0(topic: &str, payload: &[u8], v5: bool) -> Bytes {
    let mut rest = Vec::with_capacity(topic.len() + payload.len() + 3);
    rest.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    rest.extend_from_slice(topic.as_bytes());
    if v5 {
        rest.push(0);
    }
    rest.extend_from_slice(payload);
    let mut out = Vec::with_capacity(rest.len() + 5);
    out.push(kind::PUBLISH << 4);
    put_length(&mut out, rest.len());
    out.extend_from_slice(&rest);
    out.into()
}

/// What the front door needs of a PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// 0, 1 or 2.
    pub qos: u8,
    /// A resend of a packet whose acknowledgement was lost.
    pub dup: bool,
    /// The retain flag.
    pub retain: bool,
    /// The topic as sent (empty when an MQTT 5 topic alias stands for it).
    pub topic: Bytes,
    /// The packet id (QoS 1 and 2).
    pub pkid: u16,
    /// MQTT 5 topic alias, if any.
    pub alias: Option<u16>,
    /// The payload.
    pub payload: Bytes,
    /// Where the properties (MQTT 5) start and end in the frame's body.
    props: (usize, usize),
}

/// Reads a PUBLISH frame of a client speaking MQTT 5 (`v5`) or 3.1.1.
pub fn publish(frame: &Frame, v5: bool) -> Result<Publish, MqttError> {
    let qos = (frame.byte1 >> 1) & 0x03;
    if qos == 3 {
        return Err(MqttError::Malformed("PUBLISH QoS 3"));
    }
    let body = frame.body();
    let (topic, mut at) = field(body, 0, "PUBLISH topic")?;
    let topic_at = 2;
    let topic = frame
        .raw
        .slice(frame.body_at + topic_at..frame.body_at + topic_at + topic.len());
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16_at(body, at, "PUBLISH packet id")?;
        if pkid == 0 {
            return Err(MqttError::Malformed("PUBLISH packet id 0"));
        }
        at += 2;
    }
    let mut alias = None;
    let props_start = at;
    if v5 {
        let (len, n) = get_length(body, at)?;
        let end = at + n + len;
        let props = body
            .get(at + n..end)
            .ok_or(MqttError::Malformed("PUBLISH properties"))?;
        alias = topic_alias(props)?;
        at = end;
    }
    if std::str::from_utf8(&topic).is_err() {
        return Err(MqttError::Malformed("PUBLISH topic (not UTF-8)"));
    }
    Ok(Publish {
        qos,
        dup: frame.byte1 & 0x08 != 0,
        retain: frame.byte1 & 0x01 != 0,
        topic,
        pkid,
        alias,
        payload: frame.raw.slice((frame.body_at + at).min(frame.raw.len())..),
        props: (props_start, at),
    })
}

/// The topic alias among MQTT 5 PUBLISH properties, skipping the others.
fn topic_alias(props: &[u8]) -> Result<Option<u16>, MqttError> {
    let bad = MqttError::Malformed("PUBLISH properties");
    let mut at = 0;
    let mut alias = None;
    while at < props.len() {
        let id = props[at];
        at += 1;
        at += match id {
            0x01 => 1, // payload format indicator
            0x02 => 4, // message expiry interval
            0x23 => {
                alias = Some(u16_at(props, at, "topic alias")?);
                2
            }
            0x03 | 0x08 => field(props, at, "PUBLISH property")?.1 - at, // content type, response topic
            0x09 => field(props, at, "PUBLISH property")?.1 - at,        // correlation data
            0x26 => {
                // user property: two strings
                let (_, next) = field(props, at, "user property")?;
                field(props, next, "user property")?.1 - at
            }
            0x0B => get_length(props, at)?.1, // subscription identifier
            _ => return Err(bad),
        };
        if at > props.len() {
            return Err(bad);
        }
    }
    Ok(alias)
}

/// The same PUBLISH at QoS 0 on `topic`, for the embedded broker's local subscribers: no packet
/// id, no DUP, no topic alias (MQTT 5 properties otherwise kept).
pub fn as_qos0(frame: &Frame, p: &Publish, topic: &[u8], v5: bool) -> Bytes {
    let body = frame.body();
    let mut rest = Vec::with_capacity(body.len() + topic.len());
    rest.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    rest.extend_from_slice(topic);
    if v5 {
        let (from, to) = p.props;
        let mut props = Vec::new();
        if let Ok((len, n)) = get_length(body, from) {
            let all = body.get(from + n..from + n + len).unwrap_or_default();
            strip_alias(all, &mut props);
        }
        let _ = to;
        put_length(&mut rest, props.len());
        rest.extend_from_slice(&props);
    }
    rest.extend_from_slice(&p.payload);
    let mut out = Vec::with_capacity(rest.len() + 5);
    out.push((kind::PUBLISH << 4) | (frame.byte1 & 0x01));
    put_length(&mut out, rest.len());
    out.extend_from_slice(&rest);
    out.into()
}

/// Copies MQTT 5 PUBLISH properties without the topic alias (already checked well formed).
fn strip_alias(props: &[u8], out: &mut Vec<u8>) {
    let mut at = 0;
    while at < props.len() {
        let start = at;
        let id = props[at];
        at += 1;
        let len = match id {
            0x01 => Some(1),
            0x02 => Some(4),
            0x23 => Some(2),
            0x03 | 0x08 | 0x09 => field(props, at, "p").ok().map(|(_, n)| n - at),
            0x26 => field(props, at, "p")
                .and_then(|(_, n)| field(props, n, "p"))
                .ok()
                .map(|(_, n)| n - at),
            0x0B => get_length(props, at).ok().map(|(_, n)| n),
            _ => None,
        };
        let Some(len) = len else { return };
        at += len;
        if id != 0x23 {
            out.extend_from_slice(props.get(start..at).unwrap_or_default());
        }
    }
}

/// Topic aliases an MQTT 5 client may use towards the agent, as rumqttd allowed them.
pub const TOPIC_ALIAS_MAX: u16 = 4096;

/// A CONNACK accepting the connection, as rumqttd answers a clean session: no session present;
/// MQTT 5 declares [`TOPIC_ALIAS_MAX`].
pub fn connack_accepted(v5: bool) -> Bytes {
    if v5 {
        let [hi, lo] = TOPIC_ALIAS_MAX.to_be_bytes();
        Bytes::from(vec![0x20, 6, 0, 0, 3, 0x22, hi, lo])
    } else {
        Bytes::from_static(&[0x20, 2, 0, 0])
    }
}

/// A CONNACK refusing the connection: `v4_code` for MQTT 3.1.1, `v5_reason` for MQTT 5.
pub fn connack_refused(v5: bool, v4_code: u8, v5_reason: u8) -> Bytes {
    if v5 {
        Bytes::from(vec![0x20, 3, 0, v5_reason, 0])
    } else {
        Bytes::from(vec![0x20, 2, 0, v4_code])
    }
}

/// A SUBSCRIBE: its packet id and each filter with where it sits in the frame's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet id.
    pub pkid: u16,
    /// The filters, in order.
    pub filters: Vec<String>,
    /// Where the filter list starts in the body (after packet id and properties).
    list_at: usize,
}

/// Reads a SUBSCRIBE frame.
pub fn subscribe(frame: &Frame, v5: bool) -> Result<Subscribe, MqttError> {
    let b = frame.body();
    let pkid = u16_at(b, 0, "SUBSCRIBE packet id")?;
    let mut at = 2;
    if v5 {
        let (len, n) = get_length(b, at)?;
        at += n + len;
    }
    let list_at = at;
    let mut filters = Vec::new();
    while at < b.len() {
        let (f, next) = field(b, at, "SUBSCRIBE filter")?;
        b.get(next)
            .ok_or(MqttError::Malformed("SUBSCRIBE options"))?;
        filters.push(
            std::str::from_utf8(f)
                .map_err(|_| MqttError::Malformed("SUBSCRIBE filter (not UTF-8)"))?
                .to_owned(),
        );
        at = next + 1;
    }
    if filters.is_empty() {
        return Err(MqttError::Malformed("SUBSCRIBE without filters"));
    }
    Ok(Subscribe {
        pkid,
        filters,
        list_at,
    })
}

/// The same SUBSCRIBE with only the filters `keep` says yes to (at least one).
pub fn keep_filters(frame: &Frame, s: &Subscribe, keep: &[bool]) -> Bytes {
    let b = frame.body();
    let mut rest = b[..s.list_at].to_vec();
    let mut at = s.list_at;
    for k in keep {
        let Ok((_, next)) = field(b, at, "f") else {
            break;
        };
        if *k {
            rest.extend_from_slice(b.get(at..=next).unwrap_or_default());
        }
        at = next + 1;
    }
    let mut out = vec![frame.byte1];
    put_length(&mut out, rest.len());
    out.extend_from_slice(&rest);
    out.into()
}

/// A SUBACK for `pkid` with one code per filter.
pub fn suback(pkid: u16, codes: &[u8], v5: bool) -> Bytes {
    let mut rest = pkid.to_be_bytes().to_vec();
    if v5 {
        rest.push(0);
    }
    rest.extend_from_slice(codes);
    let mut out = vec![0x90];
    put_length(&mut out, rest.len());
    out.extend_from_slice(&rest);
    out.into()
}

/// The UNSUBACK for an UNSUBSCRIBE nobody else answers (no relay to rumqttd: the client has
/// no local subscription to end): MQTT 5 says "no subscription existed" (0x11) for each filter.
pub fn unsuback(frame: &Frame, v5: bool) -> Result<Bytes, MqttError> {
    let b = frame.body();
    let pkid = u16_at(b, 0, "UNSUBSCRIBE packet id")?;
    let mut rest = pkid.to_be_bytes().to_vec();
    if v5 {
        let (len, n) = get_length(b, 2)?;
        let mut at = 2 + n + len;
        rest.push(0);
        while at < b.len() {
            at = field(b, at, "UNSUBSCRIBE filter")?.1;
            rest.push(0x11);
        }
    }
    let mut out = vec![0xB0];
    put_length(&mut out, rest.len());
    out.extend_from_slice(&rest);
    Ok(out.into())
}

/// The packet id and codes of a SUBACK frame.
pub fn suback_codes(frame: &Frame, v5: bool) -> Result<(u16, Vec<u8>), MqttError> {
    let b = frame.body();
    let pkid = u16_at(b, 0, "SUBACK packet id")?;
    let mut at = 2;
    if v5 {
        let (len, n) = get_length(b, at)?;
        at += n + len;
    }
    Ok((
        pkid,
        b.get(at..).ok_or(MqttError::Malformed("SUBACK"))?.to_vec(),
    ))
}

/// A PUBACK, PUBREC or PUBCOMP for `pkid`; `reason` (MQTT 5 only) when not success.
pub fn ack(kind: u8, pkid: u16, reason: Option<u8>) -> Bytes {
    let [hi, lo] = pkid.to_be_bytes();
    match reason {
        None => Bytes::from(vec![kind << 4, 2, hi, lo]),
        Some(r) => Bytes::from(vec![kind << 4, 3, hi, lo, r]),
    }
}

/// The packet id of a PUBREL (and its fixed flags checked).
pub fn pubrel(frame: &Frame) -> Result<u16, MqttError> {
    if frame.byte1 != 0x62 {
        return Err(MqttError::Malformed("PUBREL flags"));
    }
    u16_at(frame.body(), 0, "PUBREL packet id")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Frame {
        let mut b = BytesMut::from(bytes);
        next_frame(&mut b, 1 << 20).expect("valid").expect("whole")
    }

    fn connect_bytes(level: u8, id: &str) -> Vec<u8> {
        let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 30];
        if level == 5 {
            // Properties: session expiry interval 10 s.
            v.extend_from_slice(&[5, 0x11, 0, 0, 0, 10]);
        }
        v.extend_from_slice(&(id.len() as u16).to_be_bytes());
        v.extend_from_slice(id.as_bytes());
        let mut out = vec![0x10];
        put_length(&mut out, v.len());
        out.extend(v);
        out
    }

    /// The door's own CONNACK, read by a client's parser we did not write (rumqttc's): success,
    /// no session, and for MQTT 5 the topic aliases rumqttd allowed.
    #[test]
    fn the_doors_connack_is_what_a_client_expects() {
        let v4 = rumqttc::mqttbytes::v4::Packet::read(
            &mut BytesMut::from(&connack_accepted(false)[..]),
            1 << 10,
        );
        let rumqttc::mqttbytes::v4::Packet::ConnAck(ack) = v4.expect("a 3.1.1 CONNACK") else {
            panic!("not a CONNACK");
        };
        assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
        assert!(!ack.session_present);
        let v5 = rumqttc::v5::mqttbytes::v5::Packet::read(
            &mut BytesMut::from(&connack_accepted(true)[..]),
            None,
        );
        let rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack) = v5.expect("a 5 CONNACK") else {
            panic!("not a CONNACK");
        };
        assert_eq!(
            ack.code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
        );
        assert!(!ack.session_present);
        assert_eq!(
            ack.properties.and_then(|p| p.topic_alias_max),
            Some(TOPIC_ALIAS_MAX)
        );
    }

    #[test]
    fn connect_is_read_and_renamed_byte_for_byte_otherwise() {
        for level in [4, 5] {
            let f = frame(&connect_bytes(level, "plant/7/sensor"));
            let c = connect(&f).expect("connect");
            assert_eq!(
                (c.level, c.client_id.as_str(), c.clean, c.keep_alive),
                (level, "plant/7/sensor", true, 30)
            );
            let renamed = frame(&rename_client(&f, &c, "gw-abc", 40));
            let again = connect(&renamed).expect("renamed");
            assert_eq!(again.client_id, "gw-abc");
            assert_eq!(
                (again.level, again.clean, again.keep_alive),
                (level, true, 40)
            );
            assert_eq!(rename_client(&renamed, &again, "plant/7/sensor", 30), f.raw);
        }
    }

    /// rumqttd closes a relay whose CONNECT has no keep-alive or speaks MQTT 3.1; the door
    /// takes both, so their relays get what rumqttd takes.
    #[test]
    fn what_rumqttd_refuses_is_renamed_into_what_it_takes() {
        let mut v = vec![0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x00, 0, 0];
        v.extend_from_slice(&[0, 3, b'o', b'l', b'd']);
        let mut raw = vec![0x10];
        put_length(&mut raw, v.len());
        raw.extend(v);
        let f = frame(&raw);
        let c = connect(&f).expect("MQTT 3.1");
        assert_eq!((c.level, c.keep_alive, c.clean), (3, 0, false));
        let relayed = frame(&rename_client(&f, &c, "gw", c.keep_alive));
        assert_eq!(&relayed.body()[..7], b"\0\x04MQTT\x04");
        let r = connect(&relayed).expect("relayed");
        assert_eq!(
            (r.level, r.keep_alive, r.clean, r.client_id.as_str()),
            (4, u16::MAX, true, "gw")
        );
    }

    #[test]
    fn publishes_are_read_and_copied_at_qos0() {
        // QoS 1, v4: topic "a/b", pkid 7, payload "hi".
        let f = frame(&[0x3B, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']);
        let p = publish(&f, false).expect("publish");
        assert_eq!(
            (p.qos, p.dup, p.retain, &p.topic[..], p.pkid, &p.payload[..]),
            (1, true, true, &b"a/b"[..], 7, &b"hi"[..])
        );
        let copy = frame(&as_qos0(&f, &p, &p.topic, false));
        let q = publish(&copy, false).expect("copy");
        assert_eq!(
            (q.qos, q.dup, q.retain, &q.topic[..], &q.payload[..]),
            (0, false, true, &b"a/b"[..], &b"hi"[..])
        );
        // QoS 2, v5, empty topic with alias 3 and a user property.
        let props = [0x23, 0, 3, 0x26, 0, 1, b'k', 0, 1, b'v'];
        let mut body = vec![0, 0, 0, 9, props.len() as u8];
        body.extend_from_slice(&props);
        body.extend_from_slice(b"x");
        let mut raw = vec![0x34, body.len() as u8];
        raw.extend(body);
        let f = frame(&raw);
        let p = publish(&f, true).expect("v5");
        assert_eq!(
            (p.qos, p.alias, p.pkid, &p.payload[..]),
            (2, Some(3), 9, &b"x"[..])
        );
        let copy = frame(&as_qos0(&f, &p, b"t/1", true));
        let q = publish(&copy, true).expect("copy");
        assert_eq!(
            (&q.topic[..], q.alias, &q.payload[..]),
            (&b"t/1"[..], None, &b"x"[..])
        );
    }

    #[test]
    fn credentials_and_subscriptions_are_read() {
        // CONNECT v4 with user "u" and password "p".
        let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 30, 0, 1, b'c'];
        v.extend_from_slice(&[0, 1, b'u', 0, 1, b'p']);
        let mut raw = vec![0x10, v.len() as u8];
        raw.extend(v);
        let c = connect(&frame(&raw)).expect("connect");
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref()),
            (Some("u"), Some(&b"p"[..]))
        );
        // SUBSCRIBE v4: pkid 3, "a/#" qos 1, "b" qos 0.
        let raw = [0x82, 10, 0, 3, 0, 3, b'a', b'/', b'#', 1, 0, 1];
        let mut raw = raw.to_vec();
        raw.extend_from_slice(b"b");
        raw.push(0);
        raw[1] = (raw.len() - 2) as u8;
        let f = frame(&raw);
        let s = subscribe(&f, false).expect("subscribe");
        assert_eq!(
            (s.pkid, s.filters.clone()),
            (3, vec!["a/#".to_owned(), "b".to_owned()])
        );
        let only_b = subscribe(&frame(&keep_filters(&f, &s, &[false, true])), false).expect("kept");
        assert_eq!(only_b.filters, vec!["b".to_owned()]);
        assert_eq!(
            suback_codes(&frame(&suback(3, &[0x80, 1], true)), true).expect("suback"),
            (3, vec![0x80, 1])
        );
    }

    #[test]
    fn wills_are_read_with_their_qos_and_credentials_after_them() {
        for level in [4u8, 5] {
            // Will flag, will QoS 1, user name; keep-alive 30; id "c".
            let mut v = vec![
                0,
                4,
                b'M',
                b'Q',
                b'T',
                b'T',
                level,
                0x80 | 0x08 | 0x04 | 0x02,
            ];
            v.extend_from_slice(&[0, 30]);
            if level == 5 {
                v.push(0); // no properties
            }
            v.extend_from_slice(&[0, 1, b'c']);
            if level == 5 {
                v.extend_from_slice(&[5, 0x18, 0, 0, 0, 9]); // will delay interval 9 s
            }
            v.extend_from_slice(&[0, 3, b'w', b'/', b't', 0, 4, b'g', b'o', b'n', b'e']);
            v.extend_from_slice(&[0, 1, b'u']);
            let mut raw = vec![0x10, v.len() as u8];
            raw.extend(v);
            let c = connect(&frame(&raw)).expect("connect");
            assert_eq!(
                c.will,
                Some(Will {
                    topic: "w/t".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: 1
                }),
                "level {level}"
            );
            assert_eq!(c.username.as_deref(), Some("u"));
            // The relay's CONNECT has no will and no login.
            let relayed =
                connect(&frame(&rename_client(&frame(&raw), &c, "gw", 30))).expect("relayed");
            assert_eq!(relayed.will, None, "level {level}");
            assert_eq!(
                (relayed.client_id.as_str(), relayed.username.as_deref()),
                ("gw", None)
            );
            let copy = frame(&publish_qos0("w/t", b"gone", level == 5));
            let p = publish(&copy, level == 5).expect("publish");
            assert_eq!(
                (&p.topic[..], &p.payload[..], p.qos),
                (&b"w/t"[..], &b"gone"[..], 0)
            );
        }
    }

    #[test]
    fn framing_waits_for_whole_packets_and_bounds_them() {
        let mut b = BytesMut::from(&[0x30, 0x80][..]);
        assert_eq!(next_frame(&mut b, 100), Ok(None));
        let mut b = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert!(matches!(
            next_frame(&mut b, 1 << 20),
            Err(MqttError::TooLarge { .. })
        ));
        let mut b = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert_eq!(next_frame(&mut b, usize::MAX), Err(MqttError::Length));
        let mut b = BytesMut::from(&[0xC0, 0, 0xD0, 0][..]);
        assert_eq!(
            next_frame(&mut b, 10).expect("ok").expect("ping").kind(),
            12
        );
        assert_eq!(b.len(), 2);
    }

    proptest::proptest! {
        /// Property: any CONNECT the door takes is renamed into one rumqttd takes (rumqttc's
        /// readers, written by others, read it as 3.1.1 or 5): the new id, a clean session, a
        /// keep-alive, no will, the login kept.
        #[test]
        fn every_connect_taken_is_renamed_into_one_rumqttd_takes(
            version in 0usize..3,
            clean in proptest::bool::ANY,
            keep_alive in proptest::num::u16::ANY,
            id in "[a-z0-9/+#$]{0,24}",
            will in proptest::option::of((
                "[a-z/]{1,16}",
                proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                0u8..3,
                proptest::bool::ANY,
            )),
            user in proptest::option::of("[a-z]{1,12}"),
            password in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..20)),
            expiry in proptest::option::of(proptest::num::u32::ANY),
        ) {
            let (name, level): (&[u8], u8) =
                [(b"MQIsdp".as_slice(), 3), (b"MQTT".as_slice(), 4), (b"MQTT".as_slice(), 5)][version];
            let mut flags = if clean { 0x02 } else { 0 };
            let mut v = (name.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(name);
            v.push(level);
            let flags_at = v.len();
            v.push(0);
            v.extend(keep_alive.to_be_bytes());
            if level == 5 {
                match expiry {
                    Some(e) => {
                        v.extend([5, 0x11]);
                        v.extend(e.to_be_bytes());
                    }
                    None => v.push(0),
                }
            }
            v.extend((id.len() as u16).to_be_bytes());
            v.extend(id.as_bytes());
            if let Some((topic, payload, qos, retain)) = &will {
                flags |= 0x04 | (qos << 3) | if *retain { 0x20 } else { 0 };
                if level == 5 {
                    // Will properties: payload format indicator.
                    v.extend([2, 0x01, 1]);
                }
                v.extend((topic.len() as u16).to_be_bytes());
                v.extend(topic.as_bytes());
                v.extend((payload.len() as u16).to_be_bytes());
                v.extend(payload);
            }
            if let Some(u) = &user {
                flags |= 0x80;
                v.extend((u.len() as u16).to_be_bytes());
                v.extend(u.as_bytes());
                if let Some(p) = &password {
                    flags |= 0x40;
                    v.extend((p.len() as u16).to_be_bytes());
                    v.extend(p);
                }
            }
            v[flags_at] = flags;
            let mut raw = vec![0x10];
            put_length(&mut raw, v.len());
            raw.extend(v);
            let f = frame(&raw);
            let c = connect(&f).expect("taken");
            let renamed = rename_client(&f, &c, "gw1n2", c.keep_alive);
            let r = connect(&frame(&renamed)).expect("renamed");
            proptest::prop_assert_eq!(
                (r.level, r.client_id.as_str(), r.clean, r.will.clone()),
                (level.max(4), "gw1n2", true, None)
            );
            proptest::prop_assert_eq!(r.keep_alive, relay_keep_alive(keep_alive));
            proptest::prop_assert_ne!(r.keep_alive, 0);
            proptest::prop_assert_eq!((r.username, r.password), (None, None));
            if level == 5 {
                let p = rumqttc::v5::mqttbytes::v5::Packet::read(
                    &mut BytesMut::from(&renamed[..]),
                    None,
                );
                proptest::prop_assert!(
                    matches!(p, Ok(rumqttc::v5::mqttbytes::v5::Packet::Connect(..))),
                    "{:?}",
                    p
                );
            } else {
                match rumqttc::mqttbytes::v4::Packet::read(&mut BytesMut::from(&renamed[..]), 1 << 20) {
                    Ok(rumqttc::mqttbytes::v4::Packet::Connect(c4)) => {
                        proptest::prop_assert_eq!(c4.client_id, "gw1n2");
                        proptest::prop_assert!(c4.clean_session && c4.last_will.is_none());
                    }
                    other => proptest::prop_assert!(false, "{:?}", other),
                }
            }
        }
    }

    #[test]
    fn an_unsubscribe_nobody_else_answers_gets_its_unsuback() {
        // v4: packet id 9, one filter.
        let f = frame(&[0xA2, 5, 0, 9, 0, 1, b'a']);
        assert_eq!(unsuback(&f, false).expect("unsuback")[..], [0xB0, 2, 0, 9]);
        // v5: packet id 9, no properties, two filters.
        let f = frame(&[0xA2, 9, 0, 9, 0, 0, 1, b'a', 0, 1, b'b']);
        assert_eq!(
            unsuback(&f, true).expect("unsuback")[..],
            [0xB0, 5, 0, 9, 0, 0x11, 0x11]
        );
        assert!(unsuback(&frame(&[0xA2, 1, 0]), false).is_err());
        // A name that does not match its level is refused.
        let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 3, 0x02, 0, 10, 0, 1, b'x'];
        let mut raw = vec![0x10, v.len() as u8];
        raw.append(&mut v);
        assert!(connect(&frame(&raw)).is_err());
    }

    /// Property: random bytes never panic any reader.
    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = bytes.first_mut() {
                *b = [0x10, 0x30, 0x32, 0x34, 0x3A, 0x62, 0x82, 0x90][next() as usize % 8];
            }
            if bytes.len() > 1 {
                bytes[1] = (len - 2) as u8;
            }
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some(f)) = next_frame(&mut buf, 1 << 20) {
                if let Ok(c) = connect(&f) {
                    let _ = rename_client(&f, &c, "x", 0);
                }
                for v5 in [false, true] {
                    if let Ok(p) = publish(&f, v5) {
                        let _ = as_qos0(&f, &p, &p.topic, v5);
                    }
                }
                let _ = pubrel(&f);
                for v5 in [false, true] {
                    if let Ok(sub) = subscribe(&f, v5) {
                        let keep: Vec<bool> = sub.filters.iter().map(|_| true).collect();
                        let _ = keep_filters(&f, &sub, &keep);
                    }
                    let _ = suback_codes(&f, v5);
                }
            }
        }
    }
}
