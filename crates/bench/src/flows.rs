//! Calls that take several requests: the whole connect flow (connect session → link → the
//! simulator's consent, auto-approved → callback), listing connections, reading tokens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http::{Method, StatusCode};
use serde_json::json;

use crate::client::{self, path_and_query, request, Conn};

/// One client's keep-alive connections to tokenkeeper and to the simulator.
pub struct Flow {
    tk: Conn,
    tk_addr: SocketAddr,
    sim: Conn,
    sim_addr: SocketAddr,
    api_key: String,
    return_to: String,
}

impl Flow {
    pub async fn open(tk_url: &str, sim_addr: SocketAddr, api_key: &str) -> anyhow::Result<Flow> {
        let tk_addr = client::addr_of(tk_url)?;
        Ok(Flow {
            tk: Conn::open(tk_addr).await?,
            tk_addr,
            sim: Conn::open(sim_addr).await?,
            sim_addr,
            api_key: api_key.to_owned(),
            return_to: format!("{}/bench/done", tk_url.trim_end_matches('/')),
        })
    }

    /// Runs one complete authorization as a user's browser would; returns the new
    /// connection's id.
    pub async fn connect(&mut self, end_user_id: &str) -> anyhow::Result<String> {
        let session = self
            .tk
            .send(
                request(Method::POST, self.tk_addr, "/v1/connect-sessions")
                    .bearer(&self.api_key)
                    .json(&json!({"provider": "notion", "end_user_id": end_user_id, "return_to": self.return_to})),
            )
            .await?
            .expect(StatusCode::CREATED)?
            .json()?;
        let link = session["url"]
            .as_str()
            .context("a connect session without url")?;
        let to_notion = self
            .tk
            .send(request(Method::GET, self.tk_addr, &path_and_query(link)?).empty())
            .await?;
        let authorize = to_notion.location()?.to_owned();
        // The link binds the attempt to this "browser" with a cookie; the callback refuses a
        // state presented without it. Only its `name=value` goes back, as a browser sends it.
        let attempt_cookie = to_notion
            .headers
            .get(http::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .context("the connect link set no attempt cookie")?
            .to_owned();
        if client::addr_of(&authorize)? != self.sim_addr {
            bail!("the connect link led to {authorize}, not to the simulator");
        }
        let consent = self
            .sim
            .send(request(Method::GET, self.sim_addr, &path_and_query(&authorize)?).empty())
            .await?;
        let callback = consent.location()?.to_owned();
        let back = self
            .tk
            .send(
                request(Method::GET, self.tk_addr, &path_and_query(&callback)?)
                    .header("cookie", &attempt_cookie)
                    .empty(),
            )
            .await?;
        let landed = url::Url::parse(back.location()?)?;
        let mut id = None;
        let mut status = None;
        for (k, v) in landed.query_pairs() {
            match &*k {
                "connection_id" => id = Some(v.into_owned()),
                "status" => status = Some(v.into_owned()),
                _ => {}
            }
        }
        match (id, status.as_deref()) {
            (Some(id), Some("connected")) => Ok(id),
            (id, status) => {
                bail!("the callback answered connection {id:?} with status {status:?}: {landed}")
            }
        }
    }
}

/// Connects `n` new users through the real flow, `concurrency` at a time; prints progress.
/// Returns the connection ids and the time it took.
pub async fn connect_many(
    tk_url: &str,
    sim_addr: SocketAddr,
    api_key: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<String>, Duration)> {
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.min(n).max(1) {
        let mut flow = Flow::open(tk_url, sim_addr, api_key).await?;
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(ids);
                }
                ids.push(flow.connect(&format!("bench-user-{i}")).await?);
                if (i + 1).is_multiple_of(2000) {
                    eprintln!(
                        "    connected {}/{n} through the connect flow ({:.0}/s)",
                        i + 1,
                        (i + 1) as f64 / start.elapsed().as_secs_f64()
                    );
                }
            }
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for w in workers {
        ids.extend(w.await??);
    }
    Ok((ids, start.elapsed()))
}

/// Every connection with its current grant id, through `GET /v1/connections` pages.
pub async fn list_connections(
    tk_addr: SocketAddr,
    api_key: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut conn = Conn::open(tk_addr).await?;
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/connections?limit=1000&after={a}"),
            None => "/v1/connections?limit=1000".to_owned(),
        };
        let page = conn
            .send(request(Method::GET, tk_addr, &path).bearer(api_key).empty())
            .await?
            .expect(StatusCode::OK)?
            .json()?;
        let data = page["data"]
            .as_array()
            .context("a connection list without data")?;
        for c in data {
            let id = c["id"].as_str().context("a connection without id")?;
            let grant = c["grant_id"]
                .as_str()
                .context("a connection without grant_id")?;
            out.push((id.to_owned(), grant.to_owned()));
        }
        match page["next_after"].as_str() {
            Some(next) if !data.is_empty() => after = Some(next.to_owned()),
            _ => return Ok(out),
        }
    }
}

/// The current access token of a connection.
pub async fn access_token(
    conn: &mut Conn,
    tk_addr: SocketAddr,
    api_key: &str,
    id: &str,
) -> anyhow::Result<String> {
    let reply = conn
        .send(
            request(
                Method::GET,
                tk_addr,
                &format!("/v1/connections/{id}/access-token"),
            )
            .bearer(api_key)
            .empty(),
        )
        .await?
        .expect(StatusCode::OK)?
        .json()?;
    Ok(reply["access_token"]
        .as_str()
        .context("an access-token answer without access_token")?
        .to_owned())
}
