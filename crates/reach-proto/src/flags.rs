//! The null rules of the reachability flags: one home for what REST, frames, webhooks and the
//! SDKs all show (`is_online`, `is_notifiable`, and Reach's own last-seen time).
//!
//! - Both flags are null while the service has reachability disabled.
//! - `is_online` is null for a user not online since the latest enabling (its `online_epoch`
//!   below the service's epoch), else whether it is online now.
//! - `is_notifiable` is null for a user that never had a push binding, else whether it has one.
//! - The last-seen time is null whenever `is_online` is; while the user is online it is now, and
//!   afterwards when it went offline as subscribers saw it.

/// A service's reachability switch: whether it is on, and how many times it was turned on
/// (the epoch, bumped at each enabling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceState {
    pub enabled: bool,
    pub epoch: i64,
}

/// `is_online` by the null rules: null while reachability is disabled, or for a user not online
/// since the latest enabling (`online_epoch` below the service's epoch); else the presence.
pub fn is_online_flag(svc: ServiceState, online: bool, online_epoch: i64) -> Option<bool> {
    if !svc.enabled {
        None
    } else if online {
        Some(true)
    } else if svc.epoch > 0 && online_epoch >= svc.epoch {
        Some(false)
    } else {
        None
    }
}

/// `is_notifiable` by the null rules: null while reachability is disabled or for a user that
/// never had a push binding; else whether it has one now.
pub fn is_notifiable_flag(
    svc: ServiceState,
    ever_had_binding: bool,
    binding_count: i64,
) -> Option<bool> {
    (svc.enabled && ever_had_binding).then_some(binding_count > 0)
}

/// The last-seen time (unix seconds) beside an `is_online` value: null when it is null, `now`
/// while online, else `went_offline_at` (itself null when that time was never recorded).
pub fn last_seen(is_online: Option<bool>, went_offline_at: Option<i64>, now: i64) -> Option<i64> {
    match is_online? {
        true => Some(now),
        false => went_offline_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: ServiceState = ServiceState {
        enabled: true,
        epoch: 2,
    };
    const OFF: ServiceState = ServiceState {
        enabled: false,
        epoch: 2,
    };

    #[test]
    fn is_online_is_null_while_disabled_and_before_the_latest_enabling() {
        assert_eq!(is_online_flag(OFF, true, 2), None);
        assert_eq!(is_online_flag(ON, true, 0), Some(true));
        assert_eq!(is_online_flag(ON, false, 2), Some(false));
        assert_eq!(is_online_flag(ON, false, 1), None, "online only before");
        assert_eq!(is_online_flag(ServiceState::default(), false, 0), None);
    }

    #[test]
    fn is_notifiable_is_null_until_a_first_binding() {
        assert_eq!(is_notifiable_flag(ON, false, 0), None);
        assert_eq!(is_notifiable_flag(ON, true, 0), Some(false));
        assert_eq!(is_notifiable_flag(ON, true, 2), Some(true));
        assert_eq!(is_notifiable_flag(OFF, true, 2), None);
    }

    #[test]
    fn last_seen_follows_is_online() {
        assert_eq!(last_seen(None, Some(5), 9), None);
        assert_eq!(last_seen(Some(true), Some(5), 9), Some(9));
        assert_eq!(last_seen(Some(false), Some(5), 9), Some(5));
        assert_eq!(last_seen(Some(false), None, 9), None);
    }
}
