//go:build fleet

package agent_test

// The fleet check (make bench runs it: go test -tags fleet -run TestFleet
// ./agent): 200 agents in one process, provisioned at the same moment, must
// renew spread over the jitter window, not in one burst.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/retry"
)

func TestFleetRenewalSpread(t *testing.T) {
	const n = 200
	az := azsimtest.Start(t, azsim.Config{CertLifetime: 80 * time.Second})
	extra := "\n[renewal]\nthreshold = 0.8\njitter = \"30s\"\nfloor = \"1s\"\nretry_min = \"1s\"\nretry_max = \"5s\"\n"
	devs := make([]*device, n)
	for i := range devs {
		devs[i] = newDevice(t, az, devOpts{regID: fmt.Sprintf("fleet-%03d", i), symmetric: true, extra: extra})
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, n)
	t.Cleanup(func() {
		cancel()
		for range devs {
			<-done
		}
	})
	for _, d := range devs {
		a, err := agent.New(d.path, agent.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Version: "fleet",
			Backoff: retry.Policy{Min: 200 * time.Millisecond, Max: 5 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		go func() { a.Run(ctx); done <- struct{}{} }()
	}
	var times []time.Time
	testenv.Eventually(t, 150*time.Second, "every agent renewed once through the hub", func() bool {
		times = times[:0]
		for _, d := range devs {
			id, err := storeCurrent(d)
			if err != nil || id.Via != "hub" {
				return false
			}
			times = append(times, id.IssuedAt)
		}
		return true
	})
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	perSecond := map[int64]int{}
	peak := 0
	for _, ts := range times {
		perSecond[ts.Unix()]++
		peak = max(peak, perSecond[ts.Unix()])
	}
	spread := times[len(times)-1].Sub(times[0])
	t.Logf("FLEET %d agents renewed over %.1f s; peak %d renewals/s (all at once would be %d/s)", n, spread.Seconds(), peak, n)
	if spread < 15*time.Second || peak > n/5 {
		t.Fatalf("renewals were bunched: spread %s, peak %d/s", spread, peak)
	}
}
