package broker

import (
	"sync"
	"time"
)

// Window is a sliding-window rate limit per key (a registration id, a
// device, or "" for the whole service): at most N events in any Per. The
// zero N allows everything. Safe for concurrent use.
type Window struct {
	N   int
	Per time.Duration

	mu     sync.Mutex
	events map[string][]time.Time
}

// Allow records an event for key at now if the limit allows it; if not, it
// returns how long until it would.
func (w *Window) Allow(key string, now time.Time) (bool, time.Duration) {
	if w == nil || w.N <= 0 {
		return true, 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.events == nil {
		w.events = map[string][]time.Time{}
	}
	ev := w.events[key]
	i := 0
	for i < len(ev) && !now.Before(ev[i].Add(w.Per)) {
		i++
	}
	ev = ev[i:]
	if len(ev) >= w.N {
		w.events[key] = ev
		return false, ev[0].Add(w.Per).Sub(now)
	}
	w.events[key] = append(ev, now)
	return true, 0
}

// RetryAfterSeconds rounds a wait up to whole seconds, at least 1, as
// retry-after carries it.
func RetryAfterSeconds(d time.Duration) int {
	s := int((d + time.Second - 1) / time.Second)
	return max(s, 1)
}
