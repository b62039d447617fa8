package telemetry

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"
)

// The hub's daily quota (403002 IoTHubQuotaExceeded) has no words on MQTT:
// the hub accepts the connection (CONNACK 0), grants the subscriptions,
// answers pings, and closes the connection when it reads the first
// telemetry message or twin request, without a PUBACK or an answer; on
// every reconnect, until 00:00 UTC (docs/azure-fidelity.md). A device that
// treats that as a network failure reconnects every few seconds all day,
// and so does the rest of its fleet. So the pipeline watches for the
// pattern: a session that the hub closed after we asked something (a
// telemetry message, a twin request) and before it answered anything.
//
// The first such session may be a link that failed at the wrong moment:
// the next connection comes on the usual reconnect schedule, as a probe
// (below). A second in a row raises CondHubQuota and holds connections
// back (holdAfter):
//
//   - the next attempt (a probe) comes probeEvery plus a random part of
//     probeJitter after the refused one (each device draws its own, so a
//     fleet spreads out), and one more comes midnightDelay plus a random
//     part of midnightJitter after the next 00:00 UTC by the gateway's
//     clock, when the quota resets;
//   - a probe session sends one message (the next queued one, so nothing
//     is spent on a message that would not be sent anyway; a refused
//     message is not charged) and waits for its PUBACK before anything
//     else: the twin synchronisation and certificate renewal wait for it
//     too (HubTakes), since a twin request would close the connection just
//     the same; when nothing is queued to probe with, they go ahead and
//     their first request is the probe (release);
//   - the first PUBACK clears the condition and the drain carries on.
//
// Nothing is lost meanwhile: messages wait in the outbox (and spool files
// in the spool) as during any outage.
const (
	maxThrottleRefusals = 3
	// holdAfter refused sessions in a row hold connections back; the ones
	// before only make the next session a probe.
	holdAfter = 2
	// slowRecently: a refusal this soon after a slow PUBACK may be the
	// throttle's backlog (at most a few seconds on Azure, 10 s in azsim).
	slowRecently   = 2 * time.Minute
	probeEvery     = 10 * time.Minute
	probeJitter    = 5 * time.Minute
	midnightDelay  = 30 * time.Second
	midnightJitter = 270 * time.Second
)

// quotaWatch is the pipeline's view of the hub's quota; it outlives
// sessions.
type quotaWatch struct {
	mu       sync.Mutex
	rng      *rand.Rand
	refusals int // sessions refused in a row
	// throttled counts refusals right after slow PUBACKs, taken for
	// throttling rather than the quota (see refusedAfterSlow).
	throttled int
	since     time.Time // the first refusal of this episode
	last      time.Time // when the last refused session started
	next      time.Time // the next regular probe
	midnight  time.Time // the probe after the next 00:00 UTC
	seen      string    // what was seen, for the condition and status
	// cleared is closed when the hub acknowledges telemetry again; nil
	// while nothing is suspected.
	cleared chan struct{}
	// goAhead is closed when a probe session has no message to probe
	// with (release); made again at every refusal.
	goAhead chan struct{}
}

// QuotaStats is what the pipeline saw of the hub's quota, for status and
// health; the zero value while the hub takes messages.
type QuotaStats struct {
	Since     time.Time `json:"since"`
	Refusals  int       `json:"refusedConnections"`
	NextProbe time.Time `json:"nextProbe"`
	Seen      string    `json:"seen"`
}

// suspected reports whether the last session was refused.
func (q *quotaWatch) suspected() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.cleared != nil
}

// refused records a session (started at start) that the hub closed with
// nothing answered, and plans the next probes; hold says that connections
// are held back now (refusals in a row reached holdAfter).
func (q *quotaWatch) refused(start, now time.Time, what string) (st QuotaStats, hold bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.cleared == nil {
		q.cleared, q.since, q.refusals = make(chan struct{}), now, 0
	}
	q.refusals++
	q.goAhead = make(chan struct{})
	q.last = start
	q.next = start.Add(probeEvery + time.Duration(q.rng.Int64N(int64(probeJitter))))
	if q.midnight.IsZero() || !start.Before(q.midnight) {
		// The first refusal, or the midnight probe was this one: plan the
		// one after the next 00:00 UTC.
		day := now.UTC().Truncate(24 * time.Hour)
		q.midnight = day.Add(24*time.Hour + midnightDelay + time.Duration(q.rng.Int64N(int64(midnightJitter))))
	}
	q.seen = what
	return q.statsLocked(), q.holdingLocked()
}

// refusedAfterSlow records a refused session that came right after the
// hub slowed PUBACKs: the hub-wide backlog of its throttle may still be
// full, and a first message refused at once looks like the quota on the
// wire. It reports whether to take it for throttling (reconnect with the
// usual backoff, slower): up to maxThrottleRefusals in a row, then it is
// taken for the quota.
func (q *quotaWatch) refusedAfterSlow() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.cleared != nil || q.throttled >= maxThrottleRefusals {
		return false
	}
	q.throttled++
	return true
}

// took records a PUBACK: the hub takes messages; true if that ended a
// suspicion.
func (q *quotaWatch) took() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.throttled = 0
	if q.cleared == nil {
		return false
	}
	close(q.cleared)
	q.cleared, q.goAhead, q.refusals, q.midnight, q.seen = nil, nil, 0, time.Time{}, ""
	return true
}

// connectAfter is the earliest time for the next connection; zero when
// nothing holds it back.
func (q *quotaWatch) connectAfter() time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.holdingLocked() {
		return time.Time{}
	}
	return q.nextLocked()
}

func (q *quotaWatch) nextLocked() time.Time {
	t := q.next
	if q.midnight.Before(t) && q.midnight.After(q.last) {
		t = q.midnight
	}
	return t
}

func (q *quotaWatch) stats() QuotaStats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.statsLocked()
}

// holdingLocked: refusals in a row hold connections back (and are shown).
func (q *quotaWatch) holdingLocked() bool { return q.cleared != nil && q.refusals >= holdAfter }

func (q *quotaWatch) statsLocked() QuotaStats {
	if !q.holdingLocked() {
		return QuotaStats{}
	}
	return QuotaStats{Since: q.since, Refusals: q.refusals, NextProbe: q.nextLocked(), Seen: q.seen}
}

// release lets waitCleared's callers go ahead while a refusal is still
// suspected: the probe session has nothing queued, so the twin's or the
// renewal's first request is the probe (a refusal of it counts as one;
// with nothing to send, waiting would hold them until the next health
// message, a renewal perhaps past its certificate's end).
func (q *quotaWatch) release() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.goAhead == nil {
		return
	}
	select {
	case <-q.goAhead:
	default:
		close(q.goAhead)
	}
}

// waitCleared waits until the hub acknowledges telemetry again (or
// release), or ctx ends (false).
func (q *quotaWatch) waitCleared(ctx context.Context) bool {
	q.mu.Lock()
	ch, ahead := q.cleared, q.goAhead
	q.mu.Unlock()
	if ch == nil {
		return true
	}
	select {
	case <-ch:
		return true
	case <-ahead:
		return true
	case <-ctx.Done():
		return false
	}
}

// reason is the condition's text: what was seen, what it means, what
// happens next.
func (s QuotaStats) reason(queued int) string {
	return fmt.Sprintf("%s, %d time(s) in a row since %s, though it accepts the connection: on MQTT this is how IoT Hub refuses messages once "+
		"its daily quota is used up (403002 IoTHubQuotaExceeded; the hub gives no reason on MQTT, so it could also be refusing this device's messages for another reason). "+
		"%d message(s) wait in the outbox, none is lost; next probe at %s (one message), the quota resets at 00:00 UTC",
		s.Seen, s.Refusals, s.Since.UTC().Format(time.RFC3339), queued, s.NextProbe.UTC().Format(time.RFC3339))
}
