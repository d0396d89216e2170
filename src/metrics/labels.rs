//! The closed sets of label values, one enum per label. Answers, log lines,
//! metric labels and the series created at start all come from these, so a
//! name is spelt once.

/// An enum of label values with `as_str` (the label text) and `ALL` (every
/// value, for the series created at start).
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($variant,)+
        }

        impl $name {
            pub const ALL: &[Self] = &[$(Self::$variant,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }
    };
}

label_values! {
    /// `outcome` of `requests_total` and `request_duration_seconds`; also the
    /// `status` of a 200 answer and the `error` of any other. The 5xx ones
    /// are `unavailable` and `deadline` (the High5xxRatio alert counts both).
    Outcome {
        Published => "published",
        Spooled => "spooled",
        Duplicate => "duplicate",
        Forbidden => "forbidden",
        Unauthorized => "unauthorized",
        BadRequest => "bad_request",
        NotFound => "not_found",
        MethodNotAllowed => "method_not_allowed",
        PayloadTooLarge => "payload_too_large",
        RateLimited => "rate_limited",
        Timeout => "timeout",
        Unavailable => "unavailable",
        Deadline => "deadline",
    }
}

impl Outcome {
    /// Refused before the path named a source (steps 2-4): such requests
    /// count under no `source`, all others under their source's name.
    pub fn before_routing(self) -> bool {
        matches!(self, Self::Forbidden | Self::NotFound)
    }
}

label_values! {
    /// `reason` of `rejections_total`: the precise cause of a refused
    /// request or connection, logged and counted, never sent back.
    Reason {
        NotAllowlisted => "not_allowlisted",
        BadForwardedFor => "bad_forwarded_for",
        NotFound => "not_found",
        MethodNotAllowed => "method_not_allowed",
        DeclaredTooLarge => "declared_too_large",
        BodyTooLarge => "body_too_large",
        BadContentLength => "bad_content_length",
        BodyAborted => "body_aborted",
        BodyTimeout => "body_timeout",
        RateLimitedIp => "rate_limited_ip",
        RateLimitedGlobal => "rate_limited_global",
        TooManyInFlight => "too_many_in_flight",
        MissingSignature => "missing_signature",
        MalformedSignature => "malformed_signature",
        BadSignature => "bad_signature",
        MissingTimestamp => "missing_timestamp",
        MalformedTimestamp => "malformed_timestamp",
        StaleTimestamp => "stale_timestamp",
        MissingRequestId => "missing_request_id",
        MalformedRequestId => "malformed_request_id",
        BadAuthHeader => "bad_auth_header",
        MissingCredentials => "missing_credentials",
        BadCredentials => "bad_credentials",
        InvalidJson => "invalid_json",
        SpoolFull => "spool_full",
        SpoolFailed => "spool_failed",
        RequestDeadline => "request_deadline",
        UntrustedProxyPeer => "untrusted_proxy_peer",
        BadProxyHeader => "bad_proxy_header",
        ProxyHeaderTimeout => "proxy_header_timeout",
        HeaderTimeout => "header_timeout",
        PeerNotAllowed => "peer_not_allowed",
        TooManyConnectionsFromClient => "too_many_connections_from_client",
        AdminConnectionLimit => "admin_connection_limit",
        BadTransferEncoding => "bad_transfer_encoding",
    }
}

label_values! {
    /// `reason` of `unclassified_total` and the `x-relay-unclassified`
    /// header: why an authentic JSON body went out under
    /// `ocrolus.unclassified` instead of an event's routing key.
    Unclassified {
        NotAnObject => "not_an_object",
        NoEvent => "no_event",
        UnknownStatus => "unknown_status",
        BadEventName => "bad_event_name",
        NumberOutOfRange => "number_out_of_range",
        LoneSurrogate => "lone_surrogate",
        UnreadableFields => "unreadable_fields",
    }
}

label_values! {
    /// `result` of `config_reloads_total`.
    ReloadResult {
        Success => "success",
        Failure => "failure",
    }
}

label_values! {
    /// `reason` of `broker_connect_failures_total`.
    ConnectFailureReason {
        Unreachable => "unreachable",
        Rejected => "rejected",
        Setup => "setup",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn distinct_snake_case(names: impl Iterator<Item = &'static str>) {
        let mut seen = HashSet::new();
        for name in names {
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(seen.insert(name), "{name} twice");
        }
    }

    #[test]
    fn label_values_are_distinct_snake_case() {
        distinct_snake_case(Outcome::ALL.iter().map(|o| o.as_str()));
        distinct_snake_case(Reason::ALL.iter().map(|r| r.as_str()));
        distinct_snake_case(ReloadResult::ALL.iter().map(|r| r.as_str()));
        distinct_snake_case(Unclassified::ALL.iter().map(|r| r.as_str()));
        distinct_snake_case(ConnectFailureReason::ALL.iter().map(|r| r.as_str()));
    }
}
