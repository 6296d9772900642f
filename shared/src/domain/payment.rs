//! Payments: their states, the rules that move them, and the values a payment request may
//! carry. No I/O.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::InvalidValue;

/// Where a payment stands, as the provider's lifecycle has it (Stripe's PaymentIntent):
///
/// - `PENDING`: created, not paid yet.
/// - `FAILED`: the last attempt to pay failed. Not the end: the customer may try again, and a
///   later success verifies it.
/// - `PAID_VERIFIED`: the money arrived (an internal verification or the provider's signed
///   success). Only a refund follows.
/// - `CANCELED`: given up before it was paid. A verification still moves it to `PAID_VERIFIED`:
///   money that arrived outranks every unpaid state.
/// - `REFUNDED`: the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    Pending,
    PaidVerified,
    Failed,
    Canceled,
    Refunded,
}

impl PaymentStatus {
    pub const ALL: [PaymentStatus; 5] = [
        PaymentStatus::Pending,
        PaymentStatus::PaidVerified,
        PaymentStatus::Failed,
        PaymentStatus::Canceled,
        PaymentStatus::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "PENDING",
            PaymentStatus::PaidVerified => "PAID_VERIFIED",
            PaymentStatus::Failed => "FAILED",
            PaymentStatus::Canceled => "CANCELED",
            PaymentStatus::Refunded => "REFUNDED",
        }
    }
}

impl FromStr for PaymentStatus {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PaymentStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                InvalidValue::new(
                    "status",
                    "must be one of PENDING, PAID_VERIFIED, FAILED, CANCELED, REFUNDED",
                )
            })
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a payment was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationMethod {
    Manual,
    ProviderApi,
    BankReconciliation,
    /// By the provider's signed webhook (never chosen by an API caller).
    ProviderWebhook,
}

impl VerificationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            VerificationMethod::Manual => "manual",
            VerificationMethod::ProviderApi => "provider_api",
            VerificationMethod::BankReconciliation => "bank_reconciliation",
            VerificationMethod::ProviderWebhook => "provider_webhook",
        }
    }

    /// What an internal caller may name in `verificationMethod`.
    pub fn parse_requested(s: &str) -> Result<Self, InvalidValue> {
        match s {
            "manual" => Ok(VerificationMethod::Manual),
            "provider_api" => Ok(VerificationMethod::ProviderApi),
            "bank_reconciliation" => Ok(VerificationMethod::BankReconciliation),
            _ => Err(InvalidValue::new(
                "verificationMethod",
                "must be one of manual, provider_api, bank_reconciliation",
            )),
        }
    }
}

impl FromStr for VerificationMethod {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "provider_webhook" => Ok(VerificationMethod::ProviderWebhook),
            other => Self::parse_requested(other),
        }
    }
}

/// What can be done to a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentAction {
    /// The money arrived.
    Verify,
    /// An attempt to pay failed (the payment may still be paid).
    Fail,
    /// The payment was given up before it was paid.
    Cancel,
    Refund,
}

impl PaymentAction {
    pub const ALL: [PaymentAction; 4] = [
        PaymentAction::Verify,
        PaymentAction::Fail,
        PaymentAction::Cancel,
        PaymentAction::Refund,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentAction::Verify => "verify",
            PaymentAction::Fail => "fail",
            PaymentAction::Cancel => "cancel",
            PaymentAction::Refund => "refund",
        }
    }

    /// The event an accepted action publishes.
    pub fn event_type(self) -> &'static str {
        match self {
            PaymentAction::Verify => "payment.paid",
            PaymentAction::Fail => "payment.failed",
            PaymentAction::Cancel => "payment.canceled",
            PaymentAction::Refund => "payment.refunded",
        }
    }

    /// The outbox idempotency key of that event: one per fact, however often it is attempted.
    /// A payment is paid, canceled and refunded at most once each; it may fail many times, so a
    /// failure's fact is the payment's event `sequence` it was recorded at.
    pub fn event_idempotency_key(self, payment_id: uuid::Uuid, sequence: i32) -> String {
        match self {
            PaymentAction::Verify => format!("payment-paid-{payment_id}"),
            PaymentAction::Fail => format!("payment-failed-{payment_id}-{sequence}"),
            PaymentAction::Cancel => format!("payment-canceled-{payment_id}"),
            PaymentAction::Refund => format!("payment-refunded-{payment_id}"),
        }
    }
}

/// What an action does to a payment in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Move to this state (and publish the action's event).
    Apply(PaymentStatus),
    /// The payment is already where the action would take it: answer with it, change nothing.
    AlreadyDone,
    /// The action comes too late: the payment has moved past it (an earlier attempt's failure
    /// reported after the success). Nothing changes, and trying again changes nothing either: a
    /// provider's delivery is acknowledged. The code says why.
    Stale(&'static str),
    /// Not allowed in this state, though it may be later (a refund reported before the
    /// success it refunds): the provider's delivery is refused, so it is retried. The code says
    /// why.
    Refuse(&'static str),
}

/// The state machine, whole.
pub fn decide(from: PaymentStatus, action: PaymentAction) -> Decision {
    use PaymentAction as A;
    use PaymentStatus as S;
    match (from, action) {
        (S::Pending | S::Failed | S::Canceled, A::Verify) => Decision::Apply(S::PaidVerified),
        // Every failed attempt is recorded (and counted), the first and the next ones.
        (S::Pending | S::Failed, A::Fail) => Decision::Apply(S::Failed),
        (S::Pending | S::Failed, A::Cancel) => Decision::Apply(S::Canceled),
        (S::PaidVerified, A::Refund) => Decision::Apply(S::Refunded),
        (S::PaidVerified, A::Verify) | (S::Canceled, A::Cancel) | (S::Refunded, A::Refund) => {
            Decision::AlreadyDone
        }
        (S::PaidVerified, A::Fail | A::Cancel) => Decision::Stale("payment_already_verified"),
        (S::Refunded, A::Verify | A::Fail | A::Cancel) => Decision::Stale("payment_refunded"),
        (S::Canceled, A::Fail) => Decision::Stale("payment_canceled"),
        (S::Pending | S::Failed | S::Canceled, A::Refund) => Decision::Refuse("payment_not_paid"),
    }
}

/// A currency code as written (`USD`): three capital letters. Whether it is a currency in
/// circulation is the catalog's (`currencies` table) to say.
pub fn parse_currency_code(raw: &str) -> Result<String, InvalidValue> {
    let upper = raw.trim().to_ascii_uppercase();
    if upper.len() == 3 && upper.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(upper)
    } else {
        Err(InvalidValue::new(
            "currency",
            "must be an ISO 4217 code such as USD",
        ))
    }
}

/// A payment provider's name: `stripe`, `adyen`, `bank-transfer`…
pub fn parse_provider(raw: &str) -> Result<String, InvalidValue> {
    let ok = raw.len() <= 32
        && raw.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(InvalidValue::new(
            "provider",
            "must be 1-32 of a-z, 0-9, '_' and '-', starting with a letter",
        ))
    }
}

/// Largest amount one payment may carry, in minor units: far beyond any real payment, far below
/// any sum that could overflow.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_action_has_one_decision() {
        use Decision::{AlreadyDone, Apply, Refuse, Stale};
        use PaymentAction as A;
        use PaymentStatus as S;
        let expected = [
            (S::Pending, A::Verify, Apply(S::PaidVerified)),
            (S::Pending, A::Fail, Apply(S::Failed)),
            (S::Pending, A::Cancel, Apply(S::Canceled)),
            (S::Pending, A::Refund, Refuse("payment_not_paid")),
            // A failed attempt is not the end: the next one may succeed, or fail too.
            (S::Failed, A::Verify, Apply(S::PaidVerified)),
            (S::Failed, A::Fail, Apply(S::Failed)),
            (S::Failed, A::Cancel, Apply(S::Canceled)),
            (S::Failed, A::Refund, Refuse("payment_not_paid")),
            (S::PaidVerified, A::Verify, AlreadyDone),
            (S::PaidVerified, A::Fail, Stale("payment_already_verified")),
            (
                S::PaidVerified,
                A::Cancel,
                Stale("payment_already_verified"),
            ),
            (S::PaidVerified, A::Refund, Apply(S::Refunded)),
            // Money that arrived outranks a cancellation.
            (S::Canceled, A::Verify, Apply(S::PaidVerified)),
            (S::Canceled, A::Fail, Stale("payment_canceled")),
            (S::Canceled, A::Cancel, AlreadyDone),
            (S::Canceled, A::Refund, Refuse("payment_not_paid")),
            (S::Refunded, A::Verify, Stale("payment_refunded")),
            (S::Refunded, A::Fail, Stale("payment_refunded")),
            (S::Refunded, A::Cancel, Stale("payment_refunded")),
            (S::Refunded, A::Refund, AlreadyDone),
        ];
        assert_eq!(expected.len(), S::ALL.len() * A::ALL.len());
        for (from, action, decision) in expected {
            assert_eq!(decide(from, action), decision, "{from} {action:?}");
        }
    }

    /// Whatever order a provider's deliveries arrive in, a payment that succeeded ends paid
    /// (or refunded, when the refund came too).
    #[test]
    fn deliveries_in_any_order_end_in_the_same_state() {
        use PaymentAction as A;
        let paid = [A::Fail, A::Fail, A::Verify];
        let refunded = [A::Fail, A::Verify, A::Refund];
        for (events, end) in [
            (&paid[..], PaymentStatus::PaidVerified),
            (&refunded[..], PaymentStatus::Refunded),
        ] {
            for order in permutations(events) {
                // A refused delivery (too early) is retried by the provider after the others.
                let mut state = PaymentStatus::Pending;
                let mut pending: Vec<A> = order.clone();
                for _ in 0..=events.len() {
                    pending.retain(|action| match decide(state, *action) {
                        Decision::Apply(to) => {
                            state = to;
                            false
                        }
                        Decision::Refuse(_) => true,
                        Decision::AlreadyDone | Decision::Stale(_) => false,
                    });
                }
                assert!(pending.is_empty(), "{order:?} left {pending:?}");
                assert_eq!(state, end, "{order:?}");
            }
        }
    }

    fn permutations(items: &[PaymentAction]) -> Vec<Vec<PaymentAction>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first);
                all.push(tail);
            }
        }
        all
    }

    #[test]
    fn values_round_trip_and_refuse_garbage() {
        for s in PaymentStatus::ALL {
            assert_eq!(s.as_str().parse::<PaymentStatus>().unwrap(), s);
        }
        assert!("paid".parse::<PaymentStatus>().is_err());
        assert_eq!(parse_currency_code("usd").unwrap(), "USD");
        for bad in ["US", "USDX", "U$D", "", "ÜSD"] {
            assert!(parse_currency_code(bad).is_err(), "{bad}");
        }
        assert!(parse_provider("stripe").is_ok());
        for bad in ["Stripe", "1stripe", "", "a b", &"a".repeat(33)] {
            assert!(parse_provider(bad).is_err(), "{bad}");
        }
        assert!(VerificationMethod::parse_requested("provider_webhook").is_err());
        assert_eq!(
            "provider_webhook".parse::<VerificationMethod>().unwrap(),
            VerificationMethod::ProviderWebhook
        );
        assert_eq!(
            PaymentAction::Verify.event_idempotency_key(uuid::Uuid::nil(), 1),
            "payment-paid-00000000-0000-0000-0000-000000000000"
        );
        assert_ne!(
            PaymentAction::Fail.event_idempotency_key(uuid::Uuid::nil(), 1),
            PaymentAction::Fail.event_idempotency_key(uuid::Uuid::nil(), 2),
            "each failed attempt is a fact of its own"
        );
    }
}
