//! The pages a newcomer clicks through on a fresh machine: only when Notion is the built-in
//! simulator (no credentials configured), never in front of a real Notion client, because
//! they create sessions and show connections without an API key.

use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use super::connect::{escape, page};
use super::return_to::AllowedReturnUrls;
use super::SharedState;
use crate::ids::ConnectionId;
use crate::ledger::Provider;

/// The demo's routes, mounted only when Notion is the built-in simulator (`api::router`).
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/demo/connect", post(connect))
        .route("/demo/connected", get(connected))
}

const STYLE: &str = "<style>body{font-family:system-ui,sans-serif;max-width:52em;margin:3em auto;line-height:1.5;padding:0 1em}\
code{background:#f3f3f3;padding:0 .2em}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;font-size:.9em}\
button{font-size:1em;padding:.4em 1em}</style>";

/// `/`: the demo's start page with the built-in simulator, a plain page otherwise.
pub async fn home(State(state): State<SharedState>) -> Response {
    let Some(sim) = &state.simulator else {
        return page(
            StatusCode::OK,
            "tokenkeeper",
            "tokenkeeper is running. Its API is under /v1 and needs an API key; see the README.",
        );
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokenkeeper</title>{STYLE}</head><body>\
         <h1>tokenkeeper</h1>\
         <p>No Notion credentials are configured, so Notion is played by the built-in simulator at <code>{sim}</code>. \
         Connect a (simulated) Notion workspace to see what tokenkeeper records.</p>\
         <form method=\"post\" action=\"/demo/connect\"><label>End user id <input name=\"end_user_id\" value=\"user-1\"></label> \
         <button type=\"submit\">Connect Notion</button></form>\
         <p>Connect twice with the same end user: since 2026-06-08 Notion mints a fresh pair on every authorization, \
         and tokenkeeper keeps both.</p></body></html>",
        sim = escape(sim)
    ))
    .into_response()
}

#[derive(Deserialize)]
struct ConnectForm {
    end_user_id: String,
}

async fn connect(State(state): State<SharedState>, Form(form): Form<ConnectForm>) -> Response {
    let end_user = form.end_user_id.trim();
    if end_user.is_empty() || end_user.len() > 256 {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad end user id",
            "Give an end user id of 1 to 256 characters.",
        );
    }
    // The demo page is tokenkeeper's own, so it is checked against the public URL rather than
    // the app's allow-list.
    let return_to = AllowedReturnUrls::only(&state.public_url)
        .check(&state.public("/demo/connected"))
        .expect("a page under the public URL is under the public URL");
    match state
        .new_session(Provider::Notion, end_user.to_owned(), return_to, None)
        .await
    {
        Ok((_, url)) => Redirect::to(&url).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct ConnectedQuery {
    connection_id: Option<String>,
    status: Option<String>,
}

async fn connected(State(state): State<SharedState>, Query(q): Query<ConnectedQuery>) -> Response {
    let status = q.status.unwrap_or_default();
    let Some(id) = q.connection_id.as_deref().and_then(ConnectionId::parse) else {
        return page(
            StatusCode::OK,
            "Not connected",
            &format!("The authorization ended with status {status:?}."),
        );
    };
    let (connection, grants, events) = match (
        state.store.get_connection(&id).await,
        state.store.list_grants(&id).await,
        state.store.list_events(&id).await,
    ) {
        (Ok(Some(c)), Ok(g), Ok(e)) => (c, g, e),
        _ => {
            return page(
                StatusCode::NOT_FOUND,
                "Unknown connection",
                "No such connection.",
            )
        }
    };
    let mut rows = String::new();
    for g in &grants {
        let current = connection.grant_id.as_ref() == Some(&g.id);
        rows.push_str(&format!(
            "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            escape(g.id.as_str()),
            if current { " (current)" } else { "" },
            g.origin.as_str(),
            g.obtained_at.to_rfc3339(),
            escape(&g.access_token_fingerprint),
            g.superseded_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        ));
    }
    let mut trail = String::new();
    for e in &events {
        trail.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            e.at.to_rfc3339(),
            e.kind.as_str(),
            e.grant_id
                .as_ref()
                .map(|g| escape(g.as_str()))
                .unwrap_or_default()
        ));
    }
    let id_text = escape(connection.id.as_str());
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Connected</title>{STYLE}</head><body>\
         <h1>{status}</h1>\
         <p>Connection <code>{id_text}</code> for end user <code>{user}</code>: bot <code>{bot}</code> in workspace {ws}, status <b>{st}</b>.</p>\
         <p>Your app would now call <code>GET /v1/connections/{id_text}/access-token</code> with its API key.</p>\
         <h2>Grants (every pair ever minted; fingerprints, never tokens)</h2>\
         <table><tr><th>grant</th><th>origin</th><th>obtained</th><th>access token</th><th>superseded</th></tr>{rows}</table>\
         <h2>Events</h2><table><tr><th>at</th><th>event</th><th>grant</th></tr>{trail}</table>\
         <p><a href=\"/\">Connect again</a></p></body></html>",
        status = escape(&status),
        user = escape(&connection.end_user_id),
        bot = escape(&connection.bot_id.0),
        ws = escape(connection.workspace_name.as_deref().unwrap_or(&connection.workspace_id)),
        st = connection.status.as_str(),
    ))
    .into_response()
}
