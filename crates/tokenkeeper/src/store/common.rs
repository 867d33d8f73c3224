//! Plain values both backends build their writes from.

use crate::ids::GrantId;
use crate::ledger::EventKind;

/// An audit record about to be appended.
pub(crate) struct NewEvent<'a> {
    pub kind: EventKind,
    pub grant: Option<&'a GrantId>,
    pub related: Option<&'a GrantId>,
    pub provider_request_id: Option<&'a str>,
    pub detail: serde_json::Value,
}

impl<'a> NewEvent<'a> {
    pub fn new(kind: EventKind, grant: Option<&'a GrantId>) -> Self {
        NewEvent {
            kind,
            grant,
            related: None,
            provider_request_id: None,
            detail: serde_json::json!({}),
        }
    }

    pub fn related(mut self, related: Option<&'a GrantId>) -> Self {
        self.related = related;
        self
    }

    pub fn request(mut self, id: Option<&'a str>) -> Self {
        self.provider_request_id = id;
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}
