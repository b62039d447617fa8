package telemetry_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/telemetry"
)

// pubackTimes is a Publisher that notes when each message's PUBACK was
// seen, by body.
type pubackTimes struct {
	telemetry.Publisher
	mu  sync.Mutex
	at  map[string]time.Time
	new chan struct{}
}

func (p *pubackTimes) PublishTelemetry(body []byte, sys, app map[string]string) func(context.Context) error {
	wait := p.Publisher.PublishTelemetry(body, sys, app)
	key := string(body)
	return func(ctx context.Context) error {
		err := wait(ctx)
		if err == nil {
			p.mu.Lock()
			if _, ok := p.at[key]; !ok {
				p.at[key] = time.Now()
				select {
				case p.new <- struct{}{}:
				default:
				}
			}
			p.mu.Unlock()
		}
		return err
	}
}

func (p *pubackTimes) get(key string) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.at[key]
	return t, ok
}

// BenchmarkSpoolRenameToPUBACK measures what an application sees: from
// the rename of a freshly written file into the spool to the hub's PUBACK
// for its message, through azsim's hub on this machine, with the default
// settle time of 1 s. It reports the median and the worst case besides
// the mean (ns/op).
func BenchmarkSpoolRenameToPUBACK(b *testing.B) {
	az := azsimtest.Start(b, azsim.Config{})
	r := newRig(b, rigOpts{quiet: true})
	pub := &pubackTimes{Publisher: hubSession(b, az, "gw-bench-latency"), at: map[string]time.Time{}, new: make(chan struct{}, 1)}
	r.drain(pub)
	var lat []time.Duration
	b.ResetTimer()
	for i := range b.N {
		body := fmt.Sprintf(`{"latency":%d}`, i)
		start := time.Now()
		testenv.SpoolPut(b, r.spool, fmt.Sprintf("l%d.json", i), []byte(body))
		deadline := time.After(30 * time.Second)
		for {
			if at, ok := pub.get(body); ok {
				lat = append(lat, at.Sub(start))
				break
			}
			select {
			case <-pub.new:
			case <-time.After(time.Millisecond):
			case <-deadline:
				b.Fatalf("message %d not acknowledged within 30 s", i)
			}
		}
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "ms-median")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "ms-max")
}
