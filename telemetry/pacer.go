package telemetry

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
)

// Pacing: IoT Hub takes device-to-cloud messages at a hub-wide rate (S1:
// 100 per second for the whole hub, whatever the number of devices),
// shapes what comes faster (late PUBACKs) and then closes connections
// (429002 on the hub's side; docs/azure-fidelity.md). A gateway draining a
// backlog at its own speed takes the hub's whole rate from its fleet, and
// when the fleet drains together everyone is throttled. So every publish
// of the drain (a message, a packed message, a health message alike) takes
// a token from a bucket filled at the send budget ([telemetry] max_rate),
// on the pipeline's clock; the bucket holds one second of the budget, so
// a short burst after a quiet time goes at once.
//
// The rate adapts, AIMD as in TCP: a PUBACK that comes slowMargin later
// than the quickest of the last minutes means the hub is holding our
// messages (shaping): the rate is halved, at most once per max(1 s, that
// latency) so one episode counts once; a connection that the hub closes
// after PUBACKs slowed (throttling) halves it again. Quick PUBACKs raise
// it by the budget per paceRamp, back up to the budget. It never goes
// below paceFloor, which still makes progress (a drain, however slow,
// ends). Budget 0 turns pacing off altogether (no budget, no adaptation):
// for a hub the gateway has to itself.
const (
	paceFloor  = 0.2 // messages per second: one every 5 s
	paceRamp   = 10 * time.Second
	slowMargin = 500 * time.Millisecond
	// baseWindow is how long the quickest PUBACK counts as the baseline:
	// the link's own latency may change (a cellular hand-over).
	baseWindow = time.Minute
)

// pacer is the pipeline's send budget; it outlives sessions, so a rate cut
// by throttling holds across the reconnect.
type pacer struct {
	clock clock.Clock

	mu     sync.Mutex
	budget float64 // [telemetry] max_rate in effect; 0: off
	rate   float64 // current rate, paceFloor (or the budget if lower) up to budget
	tokens float64
	at     time.Time // tokens were counted up to here
	cutAt  time.Time // the last decrease
	upAt   time.Time // quick PUBACKs were counted up to here
	slowAt time.Time // the last slow PUBACK (paced or not)
	// A two-bucket windowed minimum of PUBACK latency: the baseline.
	base    [2]time.Duration
	baseAt  time.Time // when base[0] started
	hasBase [2]bool
}

// setBudget applies the configured budget (a reload may change it). A
// rate at the old budget follows the new one; a rate cut by the hub stays
// where it is, within the new budget.
func (p *pacer) setBudget(b float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if b < 0 {
		b = 0
	}
	if b == p.budget {
		return
	}
	if p.budget == 0 || p.rate >= p.budget {
		p.rate = b
	} else {
		p.rate = max(min(p.rate, b), floorOf(b))
	}
	p.budget = b
	p.tokens = min(p.tokens, capacity(p.rate))
}

func floorOf(budget float64) float64 { return min(budget, paceFloor) }

// capacity is the bucket's size at rate: one second's worth, at least one.
func capacity(rate float64) float64 { return max(1, rate) }

// refill counts the tokens earned since the last call (mu held).
func (p *pacer) refill(now time.Time) {
	if !p.at.IsZero() && now.After(p.at) {
		p.tokens = min(p.tokens+now.Sub(p.at).Seconds()*p.rate, capacity(p.rate))
	} else if p.at.IsZero() {
		p.tokens = capacity(p.rate)
	}
	p.at = now
}

// take waits for a token; false when ctx ended first. It looks at the
// budget again at least every second, so a reload to 0 (or to a higher
// budget) frees a waiting drain at once.
func (p *pacer) take(ctx context.Context, budget func() float64) bool {
	for {
		p.setBudget(budget())
		p.mu.Lock()
		if p.budget == 0 {
			p.mu.Unlock()
			return true
		}
		p.refill(p.clock.Now())
		if p.tokens >= 1 {
			p.tokens--
			p.mu.Unlock()
			return true
		}
		d := time.Duration((1 - p.tokens) / p.rate * float64(time.Second))
		p.mu.Unlock()
		if clock.Sleep(ctx, p.clock, min(max(d, time.Millisecond), time.Second)) != nil {
			return false
		}
	}
}

// current is the rate in effect and the budget (both 0: unpaced).
func (p *pacer) current() (rate, budget float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rate, p.budget
}

// baseline is the quickest PUBACK latency of the last one to two
// baseWindows, after noting lat (mu held).
func (p *pacer) baseline(now time.Time, lat time.Duration) time.Duration {
	if p.baseAt.IsZero() || now.Sub(p.baseAt) >= baseWindow {
		p.base[1], p.hasBase[1] = p.base[0], p.hasBase[0]
		p.base[0], p.hasBase[0], p.baseAt = lat, true, now
	}
	if lat < p.base[0] || !p.hasBase[0] {
		p.base[0], p.hasBase[0] = lat, true
	}
	b := p.base[0]
	if p.hasBase[1] && p.base[1] < b {
		b = p.base[1]
	}
	return b
}

// paceEvent says what an observation did to the rate.
type paceEvent int

const (
	paceSame paceEvent = iota
	paceCut            // the rate went down
	paceFull           // the rate is back at the budget
)

// acked takes the latency of the slowest PUBACK of a batch that just came
// in, and reports whether it counts as the hub holding messages (slow)
// and what happened to the rate.
func (p *pacer) acked(now time.Time, lat time.Duration) (slow bool, ev paceEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	base := p.baseline(now, lat)
	slow = lat > base+slowMargin
	if slow {
		p.slowAt = now
	}
	if p.budget == 0 {
		return slow, paceSame
	}
	if slow {
		if now.Sub(p.cutAt) < max(time.Second, lat) {
			return slow, paceSame // the same episode
		}
		p.cut(now)
		return slow, paceCut
	}
	if p.rate >= p.budget {
		p.upAt = now
		return false, paceSame
	}
	if p.upAt.Before(p.cutAt) {
		p.upAt = p.cutAt
	}
	// Only time with PUBACKs coming counts: a quiet spell says nothing
	// about the hub.
	p.rate += p.budget * min(now.Sub(p.upAt), time.Second).Seconds() / paceRamp.Seconds()
	p.upAt = now
	if p.rate >= p.budget {
		p.rate = p.budget
		return false, paceFull
	}
	return false, paceSame
}

// slowWithin reports whether a PUBACK came slowly within d before now.
func (p *pacer) slowWithin(now time.Time, d time.Duration) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.slowAt.IsZero() && now.Sub(p.slowAt) <= d
}

// throttled halves the rate after the hub closed the connection while it
// was slowing PUBACKs.
func (p *pacer) throttled(now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.budget == 0 {
		return false
	}
	p.cut(now)
	return true
}

// cut halves the rate, down to the floor (mu held).
func (p *pacer) cut(now time.Time) {
	p.rate = max(p.rate/2, floorOf(p.budget))
	p.tokens = min(p.tokens, capacity(p.rate))
	p.cutAt, p.upAt = now, now
}

// describe says what the pacer does, for the condition's reason. It
// names no figure that changes from one cut to the next: a reason that
// stays the same is not written to status.json again (the flash), and
// status and health carry the rate in effect (sendRate).
func (p *pacer) describe() string {
	_, budget := p.current()
	if budget == 0 {
		return "not pacing ([telemetry] max_rate = 0)"
	}
	return fmt.Sprintf("sending below the %.3g messages/s budget ([telemetry] max_rate; the rate in effect is sendRate in status and health), "+
		"back up by %.3g/s every second while PUBACKs come quickly", budget, budget/paceRamp.Seconds())
}
