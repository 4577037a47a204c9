//! The gRPC methods this server serves, read once from the descriptors of
//! its services (users.v1, health, reflection).
//!
//! Call logs and metrics label a call by its entry here, never by the path
//! the client sent: a path that names no method is `unknown`, so callers
//! cannot grow the label sets (and the memory behind them) by inventing
//! paths. Each method's streaming kind comes from its descriptor, so a new
//! streaming RPC is labelled right without anything written by hand.

use std::{collections::HashMap, sync::LazyLock};

use prost::Message;
use prost_types::FileDescriptorSet;

/// How a method streams, in go-grpc-prometheus' words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unary => "unary",
            Self::ClientStream => "client_stream",
            Self::ServerStream => "server_stream",
            Self::BidiStream => "bidi_stream",
        }
    }

    /// Whether the client sends a stream of messages rather than one.
    pub fn streams_requests(self) -> bool {
        matches!(self, Self::ClientStream | Self::BidiStream)
    }
}

/// One method of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    /// `/users.v1.UsersService/GetUser`, or `unknown`.
    pub path: String,
    /// `users.v1.UsersService`, or `unknown`.
    pub service: String,
    /// `GetUser`, or `unknown`.
    pub name: String,
    pub kind: Kind,
}

impl Method {
    /// Whether this is a call of the health service.
    pub fn is_health(&self) -> bool {
        self.service == HEALTH_SERVICE
    }

    pub fn is_known(&self) -> bool {
        !std::ptr::eq(self, &*UNKNOWN)
    }
}

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

static UNKNOWN: LazyLock<Method> = LazyLock::new(|| Method {
    path: "unknown".to_owned(),
    service: "unknown".to_owned(),
    name: "unknown".to_owned(),
    kind: Kind::Unary,
});

static METHODS: LazyLock<HashMap<String, Method>> = LazyLock::new(|| {
    [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .flat_map(|encoded| {
        FileDescriptorSet::decode(encoded)
            .expect("the descriptors compiled into the binary decode")
            .file
    })
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let service_name = format!("{package}.{}", service.name());
            service.method.into_iter().map(move |method| {
                let kind = match (method.client_streaming(), method.server_streaming()) {
                    (false, false) => Kind::Unary,
                    (true, false) => Kind::ClientStream,
                    (false, true) => Kind::ServerStream,
                    (true, true) => Kind::BidiStream,
                };
                let path = format!("/{service_name}/{}", method.name());
                let entry = Method {
                    path: path.clone(),
                    service: service_name.clone(),
                    name: method.name().to_owned(),
                    kind,
                };
                (path, entry)
            })
        })
    })
    .collect()
});

/// The method a request path names, or the one `unknown` entry.
pub fn lookup(path: &str) -> &'static Method {
    METHODS.get(path).unwrap_or(&UNKNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_is_known_with_its_streaming_kind() {
        let get = lookup("/users.v1.UsersService/GetUser");
        assert_eq!(
            (get.service.as_str(), get.name.as_str(), get.kind),
            ("users.v1.UsersService", "GetUser", Kind::Unary)
        );
        assert_eq!(
            lookup("/users.v1.UsersService/ExportUsers").kind,
            Kind::ServerStream
        );
        assert_eq!(
            lookup("/grpc.health.v1.Health/Watch").kind,
            Kind::ServerStream
        );
        assert!(lookup("/grpc.health.v1.Health/Check").is_health());
        assert_eq!(
            lookup("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").kind,
            Kind::BidiStream
        );
        assert!(lookup("/users.v1.TenantsService/ListTenants").is_known());
    }

    #[test]
    fn any_other_path_is_the_one_unknown_method() {
        for path in [
            "/users.v1.UsersService/Nope",
            "/x/y",
            "",
            "/",
            &"a".repeat(4096),
        ] {
            let method = lookup(path);
            assert!(!method.is_known(), "{path}");
            assert_eq!(method.path, "unknown");
        }
    }
}
