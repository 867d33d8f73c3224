//! Sealing and opening a grant's tokens for its row: the one place where both backends turn
//! tokens into sealed bytes and back, bound to `(connection, grant, column)` (see `seal.rs`).

use crate::ids::{AccessToken, ConnectionId, GrantId, RefreshToken, SessionId};
use crate::ledger::{GrantRecord, OpenGrant};
use crate::seal::{Column, KeyRing, SealContext};

use super::StoreError;

/// A grant as stored: its record and its sealed tokens.
#[derive(Clone)]
pub(crate) struct GrantRow {
    pub record: GrantRecord,
    pub access: Vec<u8>,
    pub refresh: Option<Vec<u8>>,
}

fn context<'a>(connection: &'a str, grant: &'a str, column: Column) -> SealContext<'a> {
    SealContext {
        connection_id: connection,
        grant_id: grant,
        column,
    }
}

/// Opens a grant's tokens; a value that does not open is an error, never a guess.
pub(crate) fn open_grant(keys: &KeyRing, row: GrantRow) -> Result<OpenGrant, StoreError> {
    let (connection, grant) = (row.record.connection_id.as_str(), row.record.id.as_str());
    let access = keys.open(context(connection, grant, Column::AccessToken), &row.access)?;
    let refresh = row
        .refresh
        .map(|sealed| keys.open(context(connection, grant, Column::RefreshToken), &sealed))
        .transpose()?;
    Ok(OpenGrant {
        record: row.record,
        access_token: AccessToken::new(access),
        refresh_token: refresh.map(RefreshToken::new),
    })
}

/// Opens a grant's access token alone: what a token read needs (the refresh token stays
/// sealed, and is never held open by the cache).
pub(crate) fn open_access(
    keys: &KeyRing,
    connection: &ConnectionId,
    grant: &GrantId,
    sealed: &[u8],
) -> Result<AccessToken, StoreError> {
    let ctx = context(connection.as_str(), grant.as_str(), Column::AccessToken);
    Ok(AccessToken::new(keys.open(ctx, sealed)?))
}

/// Seals a grant's tokens for its row; returns `(access, refresh, key id)`.
pub(crate) fn seal_tokens(
    keys: &KeyRing,
    connection: &ConnectionId,
    grant: &GrantId,
    access: &AccessToken,
    refresh: Option<&RefreshToken>,
) -> (Vec<u8>, Option<Vec<u8>>, String) {
    let (c, g) = (connection.as_str(), grant.as_str());
    let access = keys.seal(context(c, g, Column::AccessToken), access.expose_secret());
    let refresh =
        refresh.map(|r| keys.seal(context(c, g, Column::RefreshToken), r.expose_secret()));
    let key_id = KeyRing::key_id_of(&access)
        .expect("a value just sealed names its key")
        .to_owned();
    (access, refresh, key_id)
}

/// Seals a reusable reconnect session's `state`, bound to its connection and session (the
/// session id takes the grant's place in the associated data; ids carry their kind's prefix,
/// so the two cannot be confused).
pub(crate) fn seal_session_state(
    keys: &KeyRing,
    connection: &ConnectionId,
    session: &SessionId,
    state: &str,
) -> Vec<u8> {
    keys.seal(
        context(
            connection.as_str(),
            session.as_str(),
            Column::ReconnectState,
        ),
        state,
    )
}

/// Opens what `seal_session_state` sealed.
pub(crate) fn open_session_state(
    keys: &KeyRing,
    connection: &ConnectionId,
    session: &SessionId,
    sealed: &[u8],
) -> Result<String, StoreError> {
    Ok(keys.open(
        context(
            connection.as_str(),
            session.as_str(),
            Column::ReconnectState,
        ),
        sealed,
    )?)
}
