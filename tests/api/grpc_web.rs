//! gRPC-Web over HTTP/1.1 on the gRPC port, byte by byte as a browser or a
//! Node client sends it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::spawn_app;

/// One gRPC-Web ListUsers request on `stream`: the headers, then (after a
/// pause, as clients that write them apart do) the body; the response's
/// head.
async fn list_users(stream: &mut tokio::net::TcpStream, token: Option<&str>) -> String {
    // An empty ListUsersRequest: a frame of flag 0 and length 0.
    let body = [0u8, 0, 0, 0, 0];
    let auth = token.map_or_else(String::new, |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST /users.v1.UsersService/ListUsers HTTP/1.1\r\nhost: users\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n{auth}\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&body).await.unwrap();
    read_response(stream).await
}

/// Reads one response (its head, then its content-length of body).
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "the connection closed: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                return text[..end].to_owned();
            }
        }
    }
}

#[tokio::test]
async fn a_grpc_web_call_refused_from_its_headers_keeps_its_connection() {
    let app = spawn_app().await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    for _ in 0..3 {
        let head = list_users(&mut stream, None).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("grpc-status: 16"), "{head}");
    }
    // The same connection then carries a call that goes through.
    let head = list_users(&mut stream, Some(&app.admin_token)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.contains("grpc-status"),
        "trailers-only answer: {head}"
    );
    app.shutdown().await;
}
