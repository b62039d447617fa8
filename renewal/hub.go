package renewal

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// hubUnansweredLimit and hubUnansweredFloor are the rule for a hub that
// does not answer certificate requests at all (no 202: silent, or the
// connection drops on the request): the hub path is abandoned for DPS
// re-registration after two such attempts in a row, or after one once less
// than a quarter of the certificate's lifetime remains, so that DPS still
// has that quarter (retries included) before the certificate expires. A
// hub that answered 202 is waited for instead (issuance can take long).
const (
	hubUnansweredLimit = 2
	hubUnansweredFloor = 0.25
)

// hubAttempts bounds the requests of one renewal through the hub: a 429
// or a 409 naming a request we do not know is tried again, up to this.
const hubAttempts = 3

// hubThrottled paces the hub's certificate requests after a 429: the hub's
// retry-after when it sent one, else this backoff.
var hubThrottled = retry.Policy{Min: time.Second, Max: 4 * time.Second}

// hubFloor is when less than hubUnansweredFloor of id's lifetime remains:
// waits for the hub end there, leaving the rest to DPS.
func hubFloor(id *provisioning.Identity) time.Time {
	return id.NotAfter.Add(-time.Duration(hubUnansweredFloor * float64(id.NotAfter.Sub(id.NotBefore))))
}

func (r *Renewer) pastHubFloor(id *provisioning.Identity) bool {
	return !r.clock.Now().Before(hubFloor(id))
}

// hubGivenUp applies that rule.
func (r *Renewer) hubGivenUp(id *provisioning.Identity) bool {
	n := r.unanswered()
	life := id.NotAfter.Sub(id.NotBefore)
	left := id.NotAfter.Sub(r.clock.Now())
	return n >= hubUnansweredLimit || (n >= 1 && life > 0 && float64(left) < hubUnansweredFloor*float64(life))
}

func (r *Renewer) unanswered() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.hubUnanswered
}

// answerGrace is how long after a reconnect (or a restart) the answer to
// a request the hub accepted may take before gwagent asks the hub again.
// An answer the hub has not sent yet comes as soon as the device is
// subscribed again; one it sent on a connection that then dropped is
// never sent again (docs/azure-fidelity.md). Asking again for the same key
// without "replace" tells the two apart at no cost: 409 naming our request
// means the hub still works on it (we wait, as before); 202 means nothing
// was active any more, so the answer was lost and this request takes over.
const answerGrace = time.Minute

// viaHub runs the hub's certificate-signing API (azure-protocol §2.5).
// After the 202 it waits until the operationExpires the hub gave (issuance
// can take hours), but not past hubFloor. It never replaces its own request
// while the hub still works on it (a 409 naming it): only a request it does
// not know (lost with a key from before a crash) is replaced. A request
// whose answer has not come answerGrace after a reconnect is asked for
// again, for the same key.
func (r *Renewer) viaHub(ctx context.Context, hub Hub, id *provisioning.Identity) error {
	now := r.clock.Now()
	r.mu.Lock()
	prev := r.pending
	var askAgain bool
	if prev != nil && prev.id.Serial == id.Serial && now.Before(prev.deadline) {
		askAgain = !prev.askAt.IsZero() && !now.Before(prev.askAt)
		if askAgain {
			prev.askAt = time.Time{} // once per connection
		}
	}
	r.mu.Unlock()
	if prev != nil && prev.id.Serial == id.Serial && now.Before(prev.deadline) {
		if !askAgain {
			return errOwnRequestPending
		}
		r.log.Info("no answer to our certificate request since the reconnect; asking the hub whether it still works on it",
			"rid", prev.rid, "waited", answerGrace)
		return r.askHub(ctx, hub, id, prev, prev)
	}
	slot, signer, err := r.newSlot(ctx, id)
	if err != nil {
		return err
	}
	p := &pendingIssue{slot: slot, signer: signer, id: id}
	r.setPending(p)
	return r.askHub(ctx, hub, id, p, prev)
}

// askHub sends a CSR for p's key, under a new rid each attempt, and takes
// the answer. prev is the request already pending, if any; p == prev when
// asking again for it. The 409 naming prev (the hub still works on it) is
// waited for, never replaced.
func (r *Renewer) askHub(ctx context.Context, hub Hub, id *provisioning.Identity, p, prev *pendingIssue) error {
	set := r.d.Settings()
	again := p == prev
	// Give up p: its key is deleted, unless it is the pending request
	// asked for again (its request may still be alive at the hub).
	drop := func() {
		if !again {
			r.clearPending(p)
			r.dropSlot(ctx, p.slot)
		}
	}
	der, err := provisioning.CSR(p.signer, id.DeviceID)
	if err != nil {
		drop()
		return err
	}
	replace := ""
	for attempt := 1; ; attempt++ {
		rid := fmt.Sprintf("gwrenew%dx%d", r.clock.Now().Unix(), attempt)
		if !again {
			r.mu.Lock()
			p.rid = rid
			r.mu.Unlock()
		}
		certs, err := hub.IssueCertificate(ctx, transport.IssueRequest{RID: rid, CSR: der, Replace: replace,
			// The SDKs wait 90 s for the 202; never longer than for the
			// certificate itself.
			AcceptTimeout: min(90*time.Second, set.IssueTimeout),
			AnswerWait:    set.IssueTimeout,
			Latest:        hubFloor(id),
			Accepted: func(rid, corr string, until time.Time) {
				r.mu.Lock()
				if p.rid != "" && p.rid != rid {
					p.earlier = append(p.earlier, p.rid)
				}
				p.rid, p.deadline = rid, until
				r.mu.Unlock()
				r.setPending(p)
				if again {
					r.log.Warn("the hub no longer had our certificate request: its answer was lost with the connection; it accepted the request again",
						"rid", rid, "correlation_id", corr, "wait_until", until)
				} else {
					r.log.Info("the hub accepted the certificate request", "rid", rid, "correlation_id", corr, "wait_until", until)
				}
			}})
		var ie *transport.IssueError
		r.mu.Lock()
		ours := prev != nil && errors.As(err, &ie) && ie.Status == 409 && prev.knows(ie.ActiveRID)
		r.mu.Unlock()
		switch {
		case err == nil:
			return r.finishHubIssue(ctx, p, certs)
		case ours && r.clock.Now().Before(ie.ActiveExpires):
			// Our own earlier request is still being worked on: wait for
			// it, never cancel it with "replace".
			drop()
			r.mu.Lock()
			prev.deadline = ie.ActiveExpires
			if f := hubFloor(id); f.Before(prev.deadline) {
				prev.deadline = f
			}
			r.mu.Unlock()
			r.setPending(prev)
			r.log.Info("the hub is still working on our earlier certificate request; waiting for it", "rid", prev.rid, "until", prev.deadline)
			// The 409 was a final answer, after which the session stops
			// listening on the credentials topic: listen again, or the
			// answer to the earlier request waits at the hub unsent.
			if err := hub.WatchCredentials(ctx); err != nil {
				r.log.Warn("cannot wait for the pending certificate answer on this connection", "err", err)
			}
			return errOwnRequestPending
		case errors.As(err, &ie) && ie.Status == 409 && replace == "" && attempt < hubAttempts:
			// A request we do not know (its key was lost with a crash
			// before it was recorded): replace it with this one.
			replace = ie.ActiveRID
			if replace == "" {
				replace = "*"
			}
			r.log.Info("a certificate request we do not know was in flight; replacing it", "active_rid", ie.ActiveRID)
			continue
		case errors.As(err, &ie) && ie.Status == 429 && attempt < hubAttempts:
			d := hubThrottled.Wait(attempt-1, err, nil)
			r.log.Info("the hub throttled the certificate request", "retry_in", d)
			if clock.Sleep(ctx, r.clock, d) == nil {
				continue
			}
		}
		if !errors.As(err, &ie) && !errors.Is(err, transport.ErrCredentialsUnanswered) {
			// The hub accepted the request (202) but its answer did not
			// come on this connection: it may still come later
			// (OnCredentials), so the new key is kept until then.
			return fmt.Errorf("hub certificate request %s: %w", rid, err)
		}
		if again {
			// The pending request stays what we wait for (until its
			// deadline, or the next connection asks again), unless the
			// hub refused this very CSR: then it cannot succeed either.
			if errors.As(err, &ie) && ie.Status == 400 {
				r.clearPending(p)
				r.dropSlot(ctx, p.slot)
			}
			return fmt.Errorf("hub certificate request %s, asking again for an earlier one: %w", rid, err)
		}
		drop()
		return err
	}
}

// OnCredentials takes a certificate answer that arrived with nobody waiting
// (the 200 after a reconnect), under ctx (the running agent's).
func (r *Renewer) OnCredentials(ctx context.Context, status int, rid string, body []byte) {
	r.mu.Lock()
	p := r.pending
	if p == nil || !p.knows(rid) {
		r.mu.Unlock()
		r.log.Info("ignoring a certificate answer for an unknown request", "rid", rid, "status", status)
		return
	}
	if status != 200 && rid != p.rid {
		// An error about a request this one took over from says nothing
		// about this one, which the hub accepted later.
		r.mu.Unlock()
		r.log.Info("ignoring an error answer to an earlier certificate request; waiting for the later one", "rid", rid, "status", status, "waiting_for", p.rid)
		return
	}
	r.pending = nil
	r.mu.Unlock()
	r.removePendingRecord()
	certs, err := transport.ParseIssueAnswer(status, body, 0)
	if err == nil {
		err = r.finishHubIssue(ctx, p, certs)
	}
	if err != nil {
		r.dropSlot(ctx, p.slot)
		r.scheduleRetry(p.id, err)
		return
	}
	r.log.Info("the certificate arrived after a reconnect", "rid", rid)
	r.mu.Lock()
	r.failures, r.retryAt = 0, time.Time{}
	r.mu.Unlock()
	r.d.EndSession()
}

// finishHubIssue validates and stages a chain from the hub.
func (r *Renewer) finishHubIssue(ctx context.Context, p *pendingIssue, certs []string) error {
	r.clearPending(p)
	chain, err := provisioning.DecodeChain(certs)
	if err == nil {
		err = provisioning.ValidateChain(chain, p.signer.Public(), p.id.DeviceID, r.clock.Now(), nil)
	}
	if err != nil {
		r.dropSlot(ctx, p.slot)
		return fmt.Errorf("certificate from the hub: %w", err)
	}
	next, err := r.d.Store.Stage(&provisioning.Identity{
		KeyURI: p.slot.Secret(), RegistrationID: p.id.RegistrationID, DeviceID: p.id.DeviceID,
		AssignedHub: p.id.AssignedHub, IssuedAt: r.clock.Now().UTC(), Via: "hub",
	}, chain)
	if err != nil {
		r.dropSlot(ctx, p.slot)
		return err
	}
	r.staged()
	r.log.Info("new certificate staged", "path", "hub", "serial", next.Serial, "not_after", next.NotAfter)
	return nil
}
