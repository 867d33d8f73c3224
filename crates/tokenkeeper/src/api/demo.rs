//! The pages a newcomer clicks through on a fresh machine: only when Notion is the built-in
//! simulator (no credentials configured), never in front of a real Notion client, because
//! they create sessions and show connections without an API key.

use askama::Template;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use super::connect::page;
use super::pages::{self, When};
use super::SharedState;
use crate::ids::ConnectionId;
use crate::ledger::Provider;
use crate::return_to::AllowedReturnUrls;

/// The demo's routes, mounted only when Notion is the built-in simulator (`api::router`).
pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/demo/connect", post(connect))
        .route("/demo/connected", get(connected))
}

#[derive(Template)]
#[template(path = "demo_home.html")]
struct Home<'a> {
    base: String,
    simulator: &'a str,
}

/// `/`: the demo's start page with the built-in simulator, the landing page otherwise.
pub async fn home(State(state): State<SharedState>) -> Response {
    let Some(sim) = &state.simulator else {
        return pages::landing(&state);
    };
    pages::render(
        StatusCode::OK,
        &Home {
            base: pages::base(&state),
            simulator: sim,
        },
    )
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
    let now = state.clock.now();
    let page = Connected {
        base: pages::base(&state),
        heading: match status.as_str() {
            "connected" => "Connected",
            "reconnected" => "Connected again",
            _ => "Connection",
        },
        connection_id: connection.id.to_string(),
        status: connection.status.as_str(),
        status_words: super::admin::words::status(connection.status).0,
        end_user: connection.end_user_id.clone(),
        workspace: connection
            .workspace_name
            .clone()
            .unwrap_or_else(|| connection.workspace_id.clone()),
        bot: connection.bot_id.0.clone(),
        grants: grants
            .iter()
            .map(|g| GrantRow {
                id: g.id.to_string(),
                current: connection.grant_id.as_ref() == Some(&g.id),
                origin: g.origin.as_str(),
                obtained: When::of(g.obtained_at, now),
                access_fp: g.access_token_fingerprint.clone(),
                superseded: g.superseded_at.map(|t| When::of(t, now)),
            })
            .collect(),
        events: events
            .iter()
            .map(|e| EventRow {
                at: When::of(e.at, now),
                kind: e.kind.as_str(),
                grant: e
                    .grant_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            })
            .collect(),
    };
    pages::render(StatusCode::OK, &page)
}

#[derive(Template)]
#[template(path = "demo_connected.html")]
struct Connected {
    base: String,
    heading: &'static str,
    connection_id: String,
    status: &'static str,
    status_words: &'static str,
    end_user: String,
    workspace: String,
    bot: String,
    grants: Vec<GrantRow>,
    events: Vec<EventRow>,
}

struct GrantRow {
    id: String,
    current: bool,
    origin: &'static str,
    obtained: When,
    access_fp: String,
    superseded: Option<When>,
}

struct EventRow {
    at: When,
    kind: &'static str,
    grant: String,
}
