//go:build fleet

package agent_test

// The fleet check (make bench runs it: go test -tags fleet -run TestFleet
// ./agent): 200 agents in one process, provisioned at the same moment, must
// renew spread over the jitter window, not in one burst. Time is a fake
// clock shared with azsim (testenv.FakeTime): the spread is measured in it.

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
	began := time.Now()
	// The agents and azsim share a fake clock: the 80-second certificates
	// are issued, checked and renewed in its time, which moves on as soon
	// as the fleet has settled into its waits, so the test takes seconds.
	ft := testenv.StartFakeTime(t, time.Now())
	ft.Allow(20 * time.Second) // provisioning and connecting, not yet renewal
	// The renewal times are measured when the certificates arrive: the
	// clock moves in small steps and the hub answers at once, so that it
	// does not run ahead of certificate requests in flight.
	ft.MaxStep(500 * time.Millisecond)
	az := azsimtest.Start(t, azsim.Config{CertLifetime: 80 * time.Second, Now: ft.Now, IssueDelay: time.Millisecond})
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
			Backoff: retry.Policy{Min: 200 * time.Millisecond, Max: 5 * time.Second}, Clock: ft})
		if err != nil {
			t.Fatal(err)
		}
		go func() { a.Run(ctx); done <- struct{}{} }()
	}
	// Once all are provisioned, the clock may run to the last planned
	// renewal of the first certificates, and not to the second renewals.
	var last time.Time
	testenv.Eventually(t, 60*time.Second, "every agent provisioned", func() bool {
		for _, d := range devs {
			id, err := storeCurrent(d)
			if err != nil {
				return false
			}
			if at := id.NotBefore.Add(time.Duration(0.8 * float64(id.NotAfter.Sub(id.NotBefore)))); at.After(last) {
				last = at
			}
		}
		return true
	})
	t.Logf("provisioned and connected in %s", time.Since(began).Round(time.Millisecond))
	began = time.Now()
	ft.AllowUntil(last.Add(time.Second))
	var times []time.Time
	testenv.Eventually(t, 60*time.Second, "every agent renewed once through the hub", func() bool {
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
	t.Logf("renewed in %s", time.Since(began).Round(time.Millisecond))
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
