//! The byte format: versioned, length-prefixed frames carrying bincode-encoded messages.
//!
//! This is the only module that knows how messages become bytes, so the format can be swapped
//! without touching anything else.
//!
//! ```text
//! frame   = length:u32-le  version:u16-le  body
//! length  = 2 + len(body)                (checked against the maximum before anything is allocated)
//! version = 0                            version negotiation: body = min:u16-le max:u16-le (frozen forever)
//!         | MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION
//!                                        body = bincode 2 (serde, standard config) of the message enum
//! ```
//!
//! Decoding distinguishes a frame that is not complete yet ([`DecodeError::Incomplete`]) from one
//! that can never be valid ([`DecodeError::Invalid`]), and a well-formed frame of a protocol
//! version this build does not speak ([`Inbound::UnsupportedVersion`]), to which the receiver
//! answers with a version-negotiation frame that every version can read. Every decode of
//! untrusted bytes goes through bincode's serde API with a byte limit, and never panics.

use crate::message::{ClientMessage, CoordinatorMessage};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The protocol version this build speaks natively.
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 4;
/// The reserved version number of version-negotiation frames.
pub const VERSION_NEGOTIATION: u16 = 0;
/// Default maximum frame size (64 MiB): a dense update of 16 million `f32`.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 64 << 20;
/// Hard ceiling on any frame (1 GiB); configured maxima are clamped to it.
pub const HARD_MAX_FRAME_BYTES: u32 = 1 << 30;
/// Bytes before the body: length (4) and version (2).
pub const HEADER_BYTES: usize = 6;

/// The bincode byte limit: no decode may claim more than a maximum-size frame.
const BINCODE_LIMIT: usize = HARD_MAX_FRAME_BYTES as usize;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<BINCODE_LIMIT>()
}

/// What a complete, well-formed frame turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound<M> {
    /// A message in a supported protocol version.
    Message {
        /// The frame's protocol version.
        version: u16,
        /// The message.
        message: M,
    },
    /// The peer speaks a version this build does not; answer with [`Codec::encode_version_negotiation`].
    UnsupportedVersion {
        /// The version the peer used.
        version: u16,
    },
    /// The peer told us which versions it speaks (sent in answer to an unsupported version).
    VersionNegotiation {
        /// Lowest version the peer speaks.
        min: u16,
        /// Highest version the peer speaks.
        max: u16,
    },
}

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer holds only part of a frame; at least `needed` bytes are required in total.
    #[error("incomplete frame: need {needed} bytes")]
    Incomplete {
        /// Total bytes required before decoding can make progress.
        needed: usize,
    },
    /// The bytes can never form a valid frame; drop the connection.
    #[error("invalid frame: {0}")]
    Invalid(#[from] InvalidFrame),
}

/// Ways a frame is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidFrame {
    /// The declared length exceeds the configured maximum (checked before allocating).
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Declared frame length.
        len: u64,
        /// Configured maximum.
        max: u32,
    },
    /// The declared length is too short to hold a version.
    #[error("frame length {0} is shorter than its header")]
    TooShort(u32),
    /// A version-negotiation body that is not exactly two `u16`, or with `min > max`.
    #[error("malformed version negotiation frame")]
    BadNegotiation,
    /// The body did not decode as a message.
    #[error("malformed message body: {0}")]
    Body(String),
    /// The body decoded but left bytes unread.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Why a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded frame would exceed the configured maximum.
    #[error("encoded frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Frame length it would have.
        len: u64,
        /// Configured maximum.
        max: u32,
    },
    /// Serialisation failed.
    #[error("serialisation failed: {0}")]
    Serialize(String),
}

/// Frame encoder and decoder with a configured maximum frame size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Codec {
    max_frame_bytes: u32,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Codec {
    /// A codec refusing frames larger than `max_frame_bytes` (clamped to [`HARD_MAX_FRAME_BYTES`]).
    pub fn new(max_frame_bytes: u32) -> Self {
        Self { max_frame_bytes: max_frame_bytes.clamp(HEADER_BYTES as u32, HARD_MAX_FRAME_BYTES) }
    }

    /// The maximum frame size in bytes, header included.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// Encodes a client message as one frame of the current protocol version.
    pub fn encode_client(&self, msg: &ClientMessage) -> Result<Vec<u8>, EncodeError> {
        self.encode(msg)
    }

    /// Encodes a coordinator message as one frame of the current protocol version.
    pub fn encode_coordinator(&self, msg: &CoordinatorMessage) -> Result<Vec<u8>, EncodeError> {
        self.encode(msg)
    }

    /// Encodes the version-negotiation frame announcing the versions this build speaks.
    pub fn encode_version_negotiation(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 4);
        out.extend_from_slice(&6u32.to_le_bytes());
        out.extend_from_slice(&VERSION_NEGOTIATION.to_le_bytes());
        out.extend_from_slice(&MIN_PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out
    }

    /// Decodes one frame carrying a client message from the front of `buf`.
    /// On success returns what it was and how many bytes it used.
    pub fn decode_client(&self, buf: &[u8]) -> Result<(Inbound<ClientMessage>, usize), DecodeError> {
        self.decode(buf)
    }

    /// Decodes one frame carrying a coordinator message from the front of `buf`.
    pub fn decode_coordinator(
        &self,
        buf: &[u8],
    ) -> Result<(Inbound<CoordinatorMessage>, usize), DecodeError> {
        self.decode(buf)
    }

    /// Reads just the header at the front of `buf`: `Ok(total frame length)` once the 4 length
    /// bytes are present and acceptable. Lets a reader size its buffer before reading the body.
    pub fn frame_len(&self, buf: &[u8]) -> Result<usize, DecodeError> {
        let Some(len_bytes) = buf.get(..4) else {
            return Err(DecodeError::Incomplete { needed: 4 });
        };
        let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if len < 2 {
            return Err(InvalidFrame::TooShort(len).into());
        }
        let total = u64::from(len) + 4;
        if total > u64::from(self.max_frame_bytes) {
            return Err(InvalidFrame::TooLarge { len: total, max: self.max_frame_bytes }.into());
        }
        Ok(total as usize)
    }

    fn encode<M: Serialize>(&self, msg: &M) -> Result<Vec<u8>, EncodeError> {
        // Size first (cheap: no copying), so an oversized message is refused before allocating
        // and the frame is allocated once at its exact size.
        let mut size = bincode::enc::write::SizeWriter::default();
        bincode::serde::encode_into_writer(msg, &mut size, bincode::config::standard())
            .map_err(|e| EncodeError::Serialize(e.to_string()))?;
        let total = (HEADER_BYTES + size.bytes_written) as u64;
        if total > u64::from(self.max_frame_bytes) {
            return Err(EncodeError::TooLarge { len: total, max: self.max_frame_bytes });
        }
        let mut out = vec![0u8; total as usize];
        let written =
            bincode::serde::encode_into_slice(msg, &mut out[HEADER_BYTES..], bincode::config::standard())
                .map_err(|e| EncodeError::Serialize(e.to_string()))?;
        debug_assert_eq!(written, size.bytes_written);
        let len = (total - 4) as u32;
        out[..4].copy_from_slice(&len.to_le_bytes());
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        Ok(out)
    }

    fn decode<M: DeserializeOwned>(&self, buf: &[u8]) -> Result<(Inbound<M>, usize), DecodeError> {
        let total = self.frame_len(buf)?;
        if buf.len() < total {
            return Err(DecodeError::Incomplete { needed: total });
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        let body = &buf[HEADER_BYTES..total];
        if version == VERSION_NEGOTIATION {
            if body.len() != 4 {
                return Err(InvalidFrame::BadNegotiation.into());
            }
            let min = u16::from_le_bytes([body[0], body[1]]);
            let max = u16::from_le_bytes([body[2], body[3]]);
            if min > max || min == VERSION_NEGOTIATION {
                return Err(InvalidFrame::BadNegotiation.into());
            }
            return Ok((Inbound::VersionNegotiation { min, max }, total));
        }
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Ok((Inbound::UnsupportedVersion { version }, total));
        }
        let (message, used): (M, usize) = bincode::serde::decode_from_slice(body, config())
            .map_err(|e| InvalidFrame::Body(e.to_string()))?;
        if used != body.len() {
            return Err(InvalidFrame::TrailingBytes(body.len() - used).into());
        }
        Ok((Inbound::Message { version, message }, total))
    }
}

/// A growable receive buffer that yields complete frames as bytes arrive in arbitrary chunks.
///
/// It never holds more than one maximum-size frame plus what the caller pushed at once: a
/// frame's header is checked against the limit as soon as its 4 length bytes are in, before the
/// body is buffered, and the buffer is sized exactly to the announced frame (no doubling). After a
/// large frame has been consumed the capacity is handed back, so a connection that once carried a
/// model-sized upload does not keep holding that much memory.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    codec: Codec,
    buf: Vec<u8>,
}

/// Capacity a [`FrameBuffer`] keeps after a frame was consumed; more is released.
const KEEP_CAPACITY: usize = 16 << 10;

impl FrameBuffer {
    /// An empty buffer using `codec`'s limits.
    pub fn new(codec: Codec) -> Self {
        Self { codec, buf: Vec::new() }
    }

    /// Changes the largest frame accepted from now on (e.g. a small limit until a peer is
    /// authenticated). A frame already partly buffered is checked against the new limit on the
    /// next call to [`next_client`](Self::next_client) / [`next_coordinator`](Self::next_coordinator).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: u32) {
        self.codec = Codec::new(max_frame_bytes);
    }

    /// The largest frame currently accepted.
    pub fn max_frame_bytes(&self) -> u32 {
        self.codec.max_frame_bytes()
    }

    /// Appends received bytes. Once the next frame's header is known and acceptable, the buffer
    /// reserves exactly that frame's size.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.buf.len() < 4 && self.buf.len() + bytes.len() >= 4 {
            let mut head = [0u8; 4];
            let have = self.buf.len();
            head[..have].copy_from_slice(&self.buf);
            head[have..].copy_from_slice(&bytes[..4 - have]);
            if let Ok(total) = self.codec.frame_len(&head) {
                // Only what this push will not already bring in.
                self.buf.reserve_exact(total.max(have + bytes.len()) - have);
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet consumed (a partial frame when non-zero after
    /// [`next_client`](Self::next_client) returned `Ok(None)`).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of memory the buffer holds (its capacity).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next complete client frame, `Ok(None)` if more bytes are needed.
    /// After an `Err` the stream is unusable and should be closed.
    pub fn next_client(&mut self) -> Result<Option<Inbound<ClientMessage>>, InvalidFrame> {
        let codec = self.codec;
        self.next_with(|b| codec.decode_client(b))
    }

    /// The next complete coordinator frame, `Ok(None)` if more bytes are needed.
    pub fn next_coordinator(&mut self) -> Result<Option<Inbound<CoordinatorMessage>>, InvalidFrame> {
        let codec = self.codec;
        self.next_with(|b| codec.decode_coordinator(b))
    }

    fn next_with<M>(
        &mut self,
        decode: impl Fn(&[u8]) -> Result<(Inbound<M>, usize), DecodeError>,
    ) -> Result<Option<Inbound<M>>, InvalidFrame> {
        match decode(&self.buf) {
            Ok((inbound, used)) => {
                self.buf.drain(..used);
                if self.buf.capacity() > KEEP_CAPACITY && self.buf.len() <= KEEP_CAPACITY {
                    self.buf.shrink_to(KEEP_CAPACITY);
                }
                if let Ok(total) = self.codec.frame_len(&self.buf) {
                    self.buf.reserve_exact(total.saturating_sub(self.buf.len()));
                }
                Ok(Some(inbound))
            }
            Err(DecodeError::Incomplete { .. }) => Ok(None),
            Err(DecodeError::Invalid(e)) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::EncodedUpdate;
    use crate::ids::{ModelVersion, RoundId};
    use crate::message::*;
    use crate::update::ModelShape;

    fn sample() -> ClientMessage {
        ClientMessage::Update(ClientUpdate {
            round: RoundId(3),
            base_version: ModelVersion(2),
            update: EncodedUpdate::RowSparse {
                shape: ModelShape::new(10, 2).unwrap(),
                rows: vec![1, 4],
                values: vec![0.5, -0.5, 1.0, 2.0],
            },
            weight: 12.0,
            metrics: LocalMetrics {
                loss: 0.3,
                hit_rate_at_10: Some(1.0),
                train_ms: 4,
                norm_within_clip: None,
            },
        })
    }

    #[test]
    fn round_trip_and_incomplete() {
        let c = Codec::default();
        let bytes = c.encode_client(&sample()).unwrap();
        let (msg, used) = c.decode_client(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(msg, Inbound::Message { version: PROTOCOL_VERSION, message: sample() });
        for cut in 0..bytes.len() {
            match c.decode_client(&bytes[..cut]) {
                Err(DecodeError::Incomplete { needed }) => assert!(needed > cut),
                other => panic!("prefix of {cut} bytes gave {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_frame_refused_before_reading_body() {
        let c = Codec::new(1024);
        let mut bytes = 5000u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            c.decode_client(&bytes),
            Err(DecodeError::Invalid(InvalidFrame::TooLarge { len: 5004, max: 1024 }))
        );
        let big = ClientMessage::Withdraw { round: RoundId(1), reason: WithdrawReason::ConsentWithdrawn };
        assert!(Codec::new(6).encode_client(&big).is_err());
    }

    #[test]
    fn unknown_version_is_typed_and_negotiation_parses() {
        let c = Codec::default();
        let mut bytes = c.encode_client(&sample()).unwrap();
        bytes[4..6].copy_from_slice(&99u16.to_le_bytes());
        let (inbound, used) = c.decode_client(&bytes).unwrap();
        assert_eq!(inbound, Inbound::UnsupportedVersion { version: 99 });
        assert_eq!(used, bytes.len());
        let neg = c.encode_version_negotiation();
        assert_eq!(
            c.decode_coordinator(&neg).unwrap().0,
            Inbound::VersionNegotiation { min: MIN_PROTOCOL_VERSION, max: PROTOCOL_VERSION }
        );
    }

    #[test]
    fn hostile_length_prefix_inside_body_is_invalid_not_abort() {
        // Variant 1 (Update) followed by a varint claiming 2^40 rows.
        let mut body = vec![1u8, 3, 2, 1, 10, 2, 253];
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut frame = ((body.len() + 2) as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        frame.extend_from_slice(&body);
        assert!(matches!(Codec::default().decode_client(&frame), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn frame_buffer_reassembles_chunks() {
        let c = Codec::default();
        let a = c.encode_client(&sample()).unwrap();
        let b = c
            .encode_client(&ClientMessage::Withdraw {
                round: RoundId(1),
                reason: WithdrawReason::TrainingFailed,
            })
            .unwrap();
        let stream: Vec<u8> = a.iter().chain(&b).copied().collect();
        let mut fb = FrameBuffer::new(c);
        let mut got = Vec::new();
        for chunk in stream.chunks(3) {
            fb.push(chunk);
            while let Some(m) = fb.next_client().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(fb.buffered(), 0);
    }

    #[test]
    fn frame_buffer_refuses_an_oversized_header_before_buffering_the_body() {
        let mut fb = FrameBuffer::new(Codec::new(16 << 10));
        // A header announcing 64 MiB, then the first 1 KiB of its body.
        let mut chunk = ((64u32 << 20) - 4).to_le_bytes().to_vec();
        chunk.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        chunk.resize(1024, 0);
        fb.push(&chunk);
        assert!(matches!(fb.next_client(), Err(InvalidFrame::TooLarge { .. })));
        assert!(fb.capacity() < 64 << 10, "reserved {} bytes for a refused frame", fb.capacity());
    }

    #[test]
    fn frame_buffer_limit_can_be_raised_and_capacity_is_released_after_a_large_frame() {
        let c = Codec::default();
        let big = ClientMessage::Update(ClientUpdate {
            round: RoundId(3),
            base_version: ModelVersion(2),
            update: EncodedUpdate::Dense {
                shape: ModelShape::new(1024, 256).unwrap(),
                values: vec![0.5; 1 << 18],
            },
            weight: 1.0,
            metrics: LocalMetrics::default(),
        });
        let frame = c.encode_client(&big).unwrap();
        let mut fb = FrameBuffer::new(Codec::new(16 << 10));
        fb.push(&frame[..4096]);
        assert!(fb.next_client().is_err(), "1 MiB frame over a 16 KiB limit");
        let mut fb = FrameBuffer::new(Codec::new(16 << 10));
        fb.set_max_frame_bytes(4 << 20);
        for chunk in frame.chunks(60_000) {
            fb.push(chunk);
            assert!(fb.capacity() <= frame.len() + 60_000, "buffer grew past the frame");
        }
        assert!(matches!(fb.next_client(), Ok(Some(Inbound::Message { .. }))));
        assert!(fb.capacity() <= 16 << 10, "kept {} bytes after the frame", fb.capacity());
    }
}

/// Serde adapters that put numeric arrays on the wire as one length-prefixed run of little-endian
/// bytes instead of element by element: a decoder then turns a million `f32` into a vector at
/// memory speed. Used through `#[serde(with = "…")]` on the large fields of the messages.
pub(crate) mod packed {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;
    use std::marker::PhantomData;
    use std::sync::Arc;

    /// A fixed-size little-endian element.
    pub(crate) trait Element: bytemuck::Pod {
        const SIZE: usize;
        fn put(self, out: &mut Vec<u8>);
        fn get(bytes: &[u8]) -> Self;
    }

    impl Element for f32 {
        const SIZE: usize = 4;
        fn put(self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.to_le_bytes());
        }
        fn get(b: &[u8]) -> Self {
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    impl Element for u32 {
        const SIZE: usize = 4;
        fn put(self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.to_le_bytes());
        }
        fn get(b: &[u8]) -> Self {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    impl Element for i8 {
        const SIZE: usize = 1;
        fn put(self, out: &mut Vec<u8>) {
            out.push(self as u8);
        }
        fn get(b: &[u8]) -> Self {
            b[0] as i8
        }
    }

    /// Serialises `values` as one byte string: on little-endian machines the memory itself
    /// (no copy), elsewhere converted element by element.
    fn serialize_packed<S: Serializer, T: Element>(values: &[T], s: S) -> Result<S::Ok, S::Error> {
        if cfg!(target_endian = "little") {
            s.serialize_bytes(bytemuck::cast_slice(values))
        } else {
            let mut out = Vec::with_capacity(values.len() * T::SIZE);
            for &v in values {
                v.put(&mut out);
            }
            s.serialize_bytes(&out)
        }
    }

    struct PackedVisitor<T>(PhantomData<T>);

    impl<'de, T: Element> Visitor<'de> for PackedVisitor<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a byte string of {}-byte little-endian elements", T::SIZE)
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            if !v.len().is_multiple_of(T::SIZE) {
                return Err(E::custom(format!(
                    "{} bytes is not a whole number of {}-byte elements",
                    v.len(),
                    T::SIZE
                )));
            }
            if cfg!(target_endian = "little") {
                // The wire format is the memory layout: one pass of unaligned loads into a fresh
                // vector (no zeroing first).
                let mut out = Vec::with_capacity(v.len() / T::SIZE);
                out.extend(v.chunks_exact(T::SIZE).map(bytemuck::pod_read_unaligned::<T>));
                return Ok(out);
            }
            Ok(v.chunks_exact(T::SIZE).map(T::get).collect())
        }
        fn visit_borrowed_bytes<E: Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
            self.visit_bytes(v)
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            self.visit_bytes(&v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // Self-describing formats may hand the bytes over one by one.
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                bytes.push(b);
            }
            self.visit_bytes(&bytes)
        }
    }

    /// `Vec<T>` as packed bytes.
    pub(crate) mod vec {
        use super::*;
        pub(crate) fn serialize<S: Serializer, T: Element>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
            serialize_packed(v, s)
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: Element>(d: D) -> Result<Vec<T>, D::Error> {
            d.deserialize_bytes(PackedVisitor(PhantomData))
        }
    }

    /// `Arc<[T]>` as packed bytes.
    pub(crate) mod arc {
        use super::*;
        pub(crate) fn serialize<S: Serializer, T: Element>(v: &Arc<[T]>, s: S) -> Result<S::Ok, S::Error> {
            serialize_packed(v, s)
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: Element>(d: D) -> Result<Arc<[T]>, D::Error> {
            d.deserialize_bytes(PackedVisitor(PhantomData)).map(Arc::from)
        }
    }

    /// `Option<Vec<T>>` as packed bytes.
    pub(crate) mod opt_vec {
        use super::*;
        use serde::Deserialize;

        struct Ser<'a, T: Element>(&'a [T]);
        impl<T: Element> serde::Serialize for Ser<'_, T> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                super::vec::serialize(self.0, s)
            }
        }
        #[derive(Deserialize)]
        #[serde(bound = "T: Element")]
        struct De<T: Element>(#[serde(with = "super::vec")] Vec<T>);

        pub(crate) fn serialize<S: Serializer, T: Element>(
            v: &Option<Vec<T>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                None => s.serialize_none(),
                Some(v) => s.serialize_some(&Ser(v)),
            }
        }
        pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: Element>(
            d: D,
        ) -> Result<Option<Vec<T>>, D::Error> {
            Ok(Option::<De<T>>::deserialize(d)?.map(|De(v)| v))
        }
    }
}

/// Why stored strategy-state bytes could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("strategy state: {0}")]
pub struct StateBytesError(String);

/// Encodes a [`StrategyState`](crate::strategy::StrategyState) for a checkpoint (bincode, the
/// wire's encoding; the store adds its own checksum).
pub fn encode_strategy_state(state: &crate::strategy::StrategyState) -> Vec<u8> {
    bincode::serde::encode_to_vec(state, config()).unwrap_or_default()
}

/// Encodes a node's share of a round for the leader (the cluster's database carries it).
pub fn encode_shard_outcome(outcome: &crate::round::ShardOutcome) -> Vec<u8> {
    bincode::serde::encode_to_vec(outcome, config()).unwrap_or_default()
}

/// Decodes [`encode_shard_outcome`]'s bytes, refusing more than `limit` bytes of input and any
/// trailing bytes. The leader checks the partial's shape and values before merging it.
pub fn decode_shard_outcome(
    bytes: &[u8],
    limit: usize,
) -> Result<crate::round::ShardOutcome, StateBytesError> {
    if bytes.len() > limit {
        return Err(StateBytesError(format!("{} bytes exceed the limit of {limit}", bytes.len())));
    }
    let (outcome, used): (crate::round::ShardOutcome, usize) =
        bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<BINCODE_LIMIT>())
            .map_err(|e| StateBytesError(e.to_string()))?;
    if used != bytes.len() {
        return Err(StateBytesError(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(outcome)
}

/// Decodes [`encode_strategy_state`]'s bytes, refusing more than `limit` bytes of input and any
/// trailing bytes (stored bytes are not trusted more than a peer's: a corrupt file must give an
/// error, not an allocation of its claimed size).
pub fn decode_strategy_state(
    bytes: &[u8],
    limit: usize,
) -> Result<crate::strategy::StrategyState, StateBytesError> {
    if bytes.len() > limit {
        return Err(StateBytesError(format!("{} bytes exceed the limit of {limit}", bytes.len())));
    }
    let (state, used): (crate::strategy::StrategyState, usize) =
        bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<BINCODE_LIMIT>())
            .map_err(|e| StateBytesError(e.to_string()))?;
    if used != bytes.len() {
        return Err(StateBytesError(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(state)
}
