package agent_test

import (
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clocksync"
)

// fakeClockSync is what the agent is told about the system clock.
type fakeClockSync struct {
	mu sync.Mutex
	r  clocksync.Reading
}

func (f *fakeClockSync) set(r clocksync.Reading) { f.mu.Lock(); f.r = r; f.mu.Unlock() }
func (f *fakeClockSync) read(time.Time) clocksync.Reading {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.r
}

// TestClockSyncWait: a clock past the build time that nothing vouches for
// holds the agent back (waiting-for-clock, clock-not-synchronised) while an
// NTP client runs and the boot is recent; it goes on once NTP synchronised
// the clock, at once when a real-time clock agrees, when no NTP client runs,
// or when the wait after boot is over: it never hangs a gateway without NTP.
func TestClockSyncWait(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	unsynced := clocksync.Reading{Detail: "not synchronised by NTP", Uptime: 10 * time.Second, Client: "/run/systemd/timesync"}
	connects := func(t *testing.T, r clocksync.Reading) {
		d := newDevice(t, az, devOpts{})
		f := &fakeClockSync{r: r}
		d.tweak = func(o *agent.Options) { o.ClockSync = f.read; o.ClockSyncWait = time.Minute }
		d.start()
		testenv.Eventually(t, 30*time.Second, "connected", func() bool { return d.status().State == "connected" })
		if reason, ok := d.status().Conditions[agent.CondClockNotSynced]; ok {
			t.Fatalf("connected with clock-not-synchronised: %s", reason)
		}
	}

	t.Run("ok/waits-for-ntp", func(t *testing.T) {
		d := newDevice(t, az, devOpts{})
		f := &fakeClockSync{r: unsynced}
		d.tweak = func(o *agent.Options) { o.ClockSync = f.read; o.ClockSyncWait = time.Minute }
		d.start()
		testenv.Eventually(t, 10*time.Second, "waiting for the clock", func() bool {
			st := d.status()
			_, raised := st.Conditions[agent.CondClockNotSynced]
			return st.State == "waiting-for-clock" && raised
		})
		time.Sleep(time.Second)
		if st := d.status(); st.State != "waiting-for-clock" || st.DeviceID != "" {
			t.Fatalf("went on without a trusted clock: state %s, device %q", st.State, st.DeviceID)
		}
		f.set(clocksync.Reading{Source: clocksync.NTP, Detail: "synchronised", Uptime: 12 * time.Second})
		testenv.Eventually(t, 30*time.Second, "connected once NTP synchronised the clock", func() bool {
			st := d.status()
			_, raised := st.Conditions[agent.CondClockNotSynced]
			return st.State == "connected" && !raised
		})
	})
	t.Run("ok/rtc-agrees", func(t *testing.T) {
		connects(t, clocksync.Reading{Source: clocksync.RTC, Detail: "rtc0 agrees", Uptime: 10 * time.Second, Client: "/run/systemd/timesync"})
	})
	t.Run("ok/no-ntp-client", func(t *testing.T) {
		r := unsynced
		r.Client = ""
		connects(t, r)
	})
	t.Run("ok/wait-after-boot-over", func(t *testing.T) {
		r := unsynced
		r.Uptime = 2 * time.Minute
		connects(t, r)
	})
}
