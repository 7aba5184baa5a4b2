//! [`ChatCodec`]: the codec of the generated client and server. It is prost's own, with
//! smaller starting buffers. [`RawCodec`]: frames as bytes, for tools that must send or
//! read what the generated types would not (the load generator, the hostile-input tests).
//!
//! Every open stream holds a codec buffer in each direction. tonic starts them at 8 KiB,
//! which for a chat server holding thousands of mostly quiet streams is most of what an
//! idle client costs; chat frames are a few hundred bytes. These start at 256 bytes (one
//! message's frame) and grow as a burst needs (the yield threshold, how much one write may
//! gather, stays 32 KiB). The price is allocations: each encoded chunk is split off the
//! buffer and is still in flight when the next is encoded, so a 256-byte buffer takes a
//! new allocation about once per message where 1 KiB took one per four or five; a
//! delivery costs two orders of magnitude more than a small allocation (BENCHMARKS.md
//! has the A/B).
//! The encoding itself is unchanged: a `ChatMessage` still writes its cached bytes.

use std::marker::PhantomData;

use bytes::{Buf as _, BufMut as _, Bytes};
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The starting size of each stream's encode and decode buffer.
const BUFFER_SIZE: usize = 256;
/// How much one encoded chunk may gather before it is handed to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with small starting buffers; named by `build.rs` as the codec of every
/// generated service and client.
#[derive(Debug)]
pub struct ChatCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for ChatCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ChatCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}

/// A codec of raw frames: the bytes given are the message sent; each message received
/// comes back as its bytes, undecoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
