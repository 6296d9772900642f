-- Payments follow the provider's lifecycle (Stripe's PaymentIntent): a failed attempt is not the
-- end of a payment.
--
--   * FAILED now means "the last attempt failed". The customer may try again and pay: a later
--     verification (a signed payment_intent.succeeded, or an internal one) moves it to
--     PAID_VERIFIED. Each failed attempt is counted (failed_attempts) and the provider's code of
--     the last one kept (last_failure, such as card_declined).
--   * CANCELED is the end of an unpaid payment (payment_intent.canceled). A verification still
--     moves it to PAID_VERIFIED: money that arrived outranks every unpaid state.
--   * The event sequence of a payment (outbox_events.aggregate_sequence) is now its version
--     minus one, taken in the transaction that bumps the version: the relay's retention deletes
--     published rows, so max(sequence) + 1 over the outbox restarted at 1 after a week. Every
--     change of a payment publishes one event, so existing payments already satisfy
--     sequence = version - 1 and nothing is renumbered.
ALTER TABLE public.payments DROP CONSTRAINT payments_status_check;
ALTER TABLE public.payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('PENDING', 'PAID_VERIFIED', 'FAILED', 'CANCELED', 'REFUNDED'));
ALTER TABLE public.payments
    ADD COLUMN failed_attempts integer NOT NULL DEFAULT 0 CHECK (failed_attempts >= 0),
    ADD COLUMN last_failure    text    CHECK (length(last_failure) BETWEEN 1 AND 255);
-- Payments that failed under the old rules had one failed attempt.
UPDATE public.payments SET failed_attempts = 1 WHERE status = 'FAILED';

ALTER TABLE public.payment_audit DROP CONSTRAINT payment_audit_action_check;
ALTER TABLE public.payment_audit ADD CONSTRAINT payment_audit_action_check
    CHECK (action IN ('create', 'verify', 'fail', 'cancel', 'refund', 'webhook'));

-- A transition writes the two new columns too.
GRANT UPDATE (failed_attempts, last_failure) ON public.payments TO meterbridge_api;
