//! Fuzzes the frame decoder: arbitrary bytes, in one piece and in chunks, must never panic, and
//! whatever decodes as an update must survive validation without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::message::ClientMessage;

fuzz_target!(|data: &[u8]| {
    let codec = Codec::new(1 << 20);
    if let Ok((Inbound::Message { message: ClientMessage::Update(u), .. }, _)) = codec.decode_client(data) {
        let shape = u.update.declared_shape();
        let _ = u.update.decode(shape, 1 << 20);
    }
    let _ = codec.decode_coordinator(data);
    let mut buffer = FrameBuffer::new(codec);
    for chunk in data.chunks(7) {
        buffer.push(chunk);
        while let Ok(Some(_)) = buffer.next_client() {}
    }
});
