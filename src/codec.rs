//! The protobuf codec of the generated services and clients: prost, with
//! buffers sized for this service's messages.
//!
//! tonic's default codec starts every call's encode and decode buffer at
//! 8 KiB. Most messages here are a few hundred bytes (a user, an id), and
//! an 8 KiB block per call is, for glibc's malloc, a "large" request that
//! first consolidates its free lists: a measurable share of a GetUser. A
//! buffer that starts small grows by doubling when a message needs more,
//! so a batch of a thousand users costs a few extra reallocations.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::BufferSettings;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// First size of a call's encode and decode buffers.
const BUFFER_SIZE: usize = 512;
/// A streaming response yields to the runtime after this many bytes (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with [`BUFFER_SIZE`] buffers.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
