package renewal

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/transport"
)

// CondReprovisionHeldBack: the hub refused our identity again, but another
// DPS registration is not allowed yet (backoff or hourly bound).
const CondReprovisionHeldBack condition.Name = "reprovisioning-held-back"

// handshakeRejectionsBeforeRefusal is how many consecutive TLS alerts about
// our certificate count as the hub refusing the identity. One alert can come
// from a middlebox or a hub restart; three in a row, with nothing else in
// between, is a refusal like CONNACK 5.
const handshakeRejectionsBeforeRefusal = 3

// ReprovisionPolicy bounds DPS re-registrations caused by the hub refusing
// the device's identity. Azure pushes a new credential to the hub
// asynchronously, so a hub may refuse a certificate DPS has just issued;
// registering again at once would only mint another key and certificate the
// hub does not know yet either. The rule:
//
//   - every DPS registration counts (the first one too): the k-th in a row
//     without an accepted hub connection in between is followed by a quiet
//     time of Backoff.Delay(k-1) (Backoff.Min after the first) in which a
//     refusal does not trigger another one; the agent keeps trying the hub
//     with the identity it has (reconnect backoff), which is what lets a
//     freshly issued certificate through once the hub has caught up;
//   - a refusal after the hub accepted the device (disabled, deleted,
//     moved) re-provisions at once: an accepted connection resets the
//     backoff;
//   - at most PerHour registrations in any hour.
type ReprovisionPolicy struct {
	Backoff retry.Policy // default 1 min to 1 h
	PerHour int          // default 4
}

func (p ReprovisionPolicy) withDefaults() ReprovisionPolicy {
	if p.Backoff.Min <= 0 {
		p.Backoff = retry.Policy{Min: time.Minute, Max: time.Hour}
	}
	if p.PerHour <= 0 {
		p.PerHour = 4
	}
	return p
}

// gate applies a ReprovisionPolicy. It is the lifecycle goroutine's own;
// it takes the time as a parameter.
type gate struct {
	policy      ReprovisionPolicy
	recent      []time.Time // re-provisionings within the last hour
	consecutive int         // since the last accepted hub connection
	notBefore   time.Time
}

// allow reports whether a re-provisioning may start at now, and if not,
// when the next one may.
func (g *gate) allow(now time.Time) (bool, time.Time) {
	g.prune(now)
	next := g.notBefore
	if len(g.recent) >= g.policy.PerHour {
		if t := g.recent[0].Add(time.Hour); t.After(next) {
			next = t
		}
	}
	return !now.Before(next), next
}

// record notes a re-provisioning started at now; delay(n) is the wait
// after the n-th (0-based) consecutive one.
func (g *gate) record(now time.Time, delay func(n int) time.Duration) {
	g.prune(now)
	g.recent = append(g.recent, now)
	g.consecutive++
	g.notBefore = now.Add(delay(g.consecutive - 1))
}

// connected resets the backoff: the hub accepted an identity.
func (g *gate) connected() {
	g.consecutive, g.notBefore = 0, time.Time{}
}

func (g *gate) prune(now time.Time) {
	i := 0
	for i < len(g.recent) && !now.Before(g.recent[i].Add(time.Hour)) {
		i++
	}
	g.recent = g.recent[i:]
}

// Refused reports whether a failed dial means the hub refused our identity:
// CONNACK 4/5 at once, or repeated handshake-level rejections. Called by
// the lifecycle goroutine after each failed dial.
func (r *Renewer) Refused(err error) bool {
	switch {
	case errors.Is(err, transport.ErrUnauthorized):
		r.hsRejections = 0
		return true
	case tlsconf.RejectedIdentity(err):
		r.hsRejections++
		if r.hsRejections >= handshakeRejectionsBeforeRefusal {
			r.hsRejections = 0
			return true
		}
		r.log.Warn("the hub rejected our certificate in the TLS handshake", "err", err, "consecutive", r.hsRejections,
			"refusal_after", handshakeRejectionsBeforeRefusal)
		return false
	}
	r.hsRejections = 0
	return false
}

// Connected is told that the hub accepted an identity: the re-provisioning
// backoff and the count of handshake rejections start afresh.
func (r *Renewer) Connected() {
	r.gate.connected()
	r.hsRejections = 0
}

// ReprovisionAfterRefusal registers again through DPS (Deps.Reprovision)
// if the policy allows it now; true means a new identity was committed.
func (r *Renewer) ReprovisionAfterRefusal(ctx context.Context, cause error) bool {
	now := r.clock.Now()
	g := &r.gate
	if ok, next := g.allow(now); !ok {
		msg := fmt.Sprintf("the hub refused our identity; %d re-provisioning(s) in the last hour, the next is not before %s (at most %d per hour)",
			len(g.recent), next.UTC().Format(time.RFC3339), g.policy.PerHour)
		r.d.Status.Raise(CondReprovisionHeldBack, msg)
		r.log.Warn("hub refused our identity; re-provisioning held back, retrying the hub with the current identity",
			"err", cause, "next_reprovision", next, "reprovisions_last_hour", len(g.recent))
		return false
	}
	r.d.Status.Clear(CondReprovisionHeldBack)
	r.log.Warn("hub refused our identity; re-provisioning through DPS", "err", cause, "consecutive", g.consecutive+1,
		"reprovisions_last_hour", len(g.recent)+1)
	return r.d.Reprovision(ctx) == nil
}

// NoteRegistration counts a DPS registration for the re-provisioning rule.
func (r *Renewer) NoteRegistration() {
	r.gate.record(r.clock.Now(), func(n int) time.Duration { return r.gate.policy.Backoff.Delay(n, r.rng) })
}
