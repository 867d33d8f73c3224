//! A minimal HTTP/1.1 client over one keep-alive connection (hyper's connection API).
//!
//! The load generator gives each worker its own `Conn`, so every request of a phase rides an
//! established connection and a measured latency never includes a TCP handshake.
//! reqwest would do, but its pool and redirect machinery cost the generator CPU that the server
//! under test, sharing the same two cores, would then miss.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

pub type Body = Full<Bytes>;

/// One keep-alive HTTP/1.1 connection to `addr`; reopened transparently after a failure.
pub struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Body>>,
}

/// A response with its whole body read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The `Location` header as a string, or an error naming the status.
    pub fn location(&self) -> anyhow::Result<&str> {
        self.headers
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("expected a redirect, got {} {}", self.status, self.text()))
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", self.text()))
    }

    /// The body as text, cut short for error messages.
    pub fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(300).collect()
    }

    /// Fails unless the status is `expected`.
    pub fn expect(self, expected: StatusCode) -> anyhow::Result<Self> {
        if self.status != expected {
            bail!("expected {expected}, got {} {}", self.status, self.text());
        }
        Ok(self)
    }
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let mut conn = Conn { addr, sender: None };
        conn.connect().await?;
        Ok(conn)
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The connection ends when the sender is dropped or the server closes it; either
            // way the next `send` notices and reconnects.
            let _ = connection.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends `req` and reads the whole response. A failed connection is dropped, so the next
    /// call opens a new one.
    pub async fn send(&mut self, req: Request<Body>) -> anyhow::Result<Reply> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.connect().await?;
        }
        let sender = self.sender.as_mut().expect("connected above");
        let result = async {
            sender.ready().await?;
            let response = sender.send_request(req).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        }
        .await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }
}

/// Builds a request for an HTTP/1.1 connection: origin-form URI and a `Host` header.
pub fn request(method: Method, addr: SocketAddr, path_and_query: &str) -> RequestBuilder {
    RequestBuilder {
        inner: Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, addr.to_string()),
    }
}

pub struct RequestBuilder {
    inner: http::request::Builder,
}

impl RequestBuilder {
    pub fn bearer(self, token: &str) -> Self {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .expect("a token is a valid header value");
        RequestBuilder {
            inner: self.inner.header(http::header::AUTHORIZATION, value),
        }
    }

    pub fn header(self, name: &'static str, value: &str) -> Self {
        RequestBuilder {
            inner: self.inner.header(name, value),
        }
    }

    pub fn json(self, body: &serde_json::Value) -> Request<Body> {
        self.inner
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a valid request")
    }

    pub fn empty(self) -> Request<Body> {
        self.inner
            .body(Full::new(Bytes::new()))
            .expect("a valid request")
    }
}

/// One request on a fresh connection, for control calls outside measured phases.
pub async fn once(addr: SocketAddr, req: Request<Body>) -> anyhow::Result<Reply> {
    Conn::open(addr).await?.send(req).await
}

/// `http://127.0.0.1:1234/…` → the socket address.
pub fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    let parsed = url::Url::parse(url).with_context(|| format!("not a URL: {url}"))?;
    let host = parsed.host_str().context("a URL without a host")?;
    let port = parsed
        .port_or_known_default()
        .context("a URL without a port")?;
    format!("{host}:{port}")
        .parse()
        .with_context(|| format!("{url} does not name a loopback address and port"))
}

/// The path and query of a URL (what an HTTP/1.1 request line carries).
pub fn path_and_query(url: &str) -> anyhow::Result<String> {
    let parsed = url::Url::parse(url).with_context(|| format!("not a URL: {url}"))?;
    Ok(match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    })
}
