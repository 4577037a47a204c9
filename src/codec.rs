//! The protobuf codec of the generated services and clients: prost, with
//! buffers sized for this service's messages.
//!
//! tonic's default codec starts every call's encode and decode buffer at
//! 8 KiB. Most messages here are a few hundred bytes (a user, an id), and
//! an 8 KiB block per call is, for glibc's malloc, a "large" request that
//! first consolidates its free lists: a measurable share of a GetUser. A
//! buffer that starts small grows by doubling when a message needs more,
//! so a batch of a thousand users costs a few extra reallocations.
//!
//! A message that cannot be decoded (bytes that are not protobuf, a string
//! that is not UTF-8, nesting past prost's recursion limit) is the caller's
//! mistake: INVALID_ARGUMENT naming the field, where tonic's codec would
//! answer INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, DecodeBuf},
};
use tonic_prost::ProstEncoder;

use crate::error::Error;

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
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(PhantomData)
    }
}

/// Decodes with prost; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct Decoder<U>(PhantomData<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            let (field, description) = describe(&error);
            Error::invalid(field, description).into()
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
    }
}

/// The field path (`user.custom_data`) and the reason of a decode error.
///
/// prost only shows its error as text: "failed to decode Protobuf message:
/// Inner.field: Outer.field: reason", innermost field first.
fn describe(error: &prost::DecodeError) -> (String, String) {
    let text = error.to_string();
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut fields = Vec::new();
    while let Some((head, tail)) = rest.split_once(": ") {
        let Some((message, field)) = head.split_once('.') else {
            break;
        };
        let is_name =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(is_name(message) && is_name(field)) {
            break;
        }
        fields.push(field);
        rest = tail;
    }
    fields.reverse();
    // Deep nesting makes a long path; its start says where it went wrong.
    fields.truncate(8);
    let field = if fields.is_empty() {
        "request".to_owned()
    } else {
        fields.join(".")
    };
    (field, format!("is not valid protobuf: {rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::v1 as pb;

    #[test]
    fn a_string_that_is_not_utf8_is_named_by_its_field_path() {
        let mut bytes = pb::CreateUserRequest {
            user: Some(pb::User {
                email: "ab".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let at = bytes.windows(2).position(|w| w == b"ab").unwrap();
        bytes[at] = 0xff;
        let error = pb::CreateUserRequest::decode(bytes.as_slice()).unwrap_err();
        let (field, description) = describe(&error);
        assert_eq!(field, "user.email");
        assert!(description.contains("UTF-8"), "{description}");
    }

    #[test]
    fn bytes_that_are_not_protobuf_name_the_request() {
        let error = pb::GetUserRequest::decode(&[0xff, 0xff, 0xff][..]).unwrap_err();
        assert_eq!(describe(&error).0, "request");
    }
}
