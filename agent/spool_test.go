package agent_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/telemetry"
)

// spoolPut writes a spool file the documented way: temporary name, rename.
var spoolPut = testenv.SpoolPut

// bodiesWith returns the received bodies that are JSON objects with key.
func bodiesWith(az *azsimtest.Azsim, deviceID, key string) []any {
	var out []any
	for _, m := range received(az, deviceID, "") {
		if b, ok := m["body"].(map[string]any); ok {
			if v, ok := b[key]; ok {
				out = append(out, v)
			}
		}
	}
	return out
}

// Hostile and broken spool files: each is refused without being sent or
// followed, moved to rejected/ with one warning, and counted; telemetry
// behind them keeps flowing.
func TestSpoolRefusesWhatIsNotAMessage(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-spool-refuse", symmetric: true})
	spool := d.cfg.Telemetry.SpoolDir
	if err := os.MkdirAll(spool, 0o770); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(d.dir, "secret.json")
	os.WriteFile(secret, []byte(`{"pin-value":"s3cr3t"}`), 0o600)

	type bad struct {
		name, reason string
		make         func(p string) error
	}
	big := append(append([]byte(`{"big":"`), bytes.Repeat([]byte("x"), 300_000)...), '"', '}')
	justOver := append(append([]byte(`{"big":"`), bytes.Repeat([]byte("x"), 256<<10-10)...), '"', '}')
	cases := []bad{
		{"link-secret.json", "a symbolic link", func(p string) error { return os.Symlink(secret, p) }},
		{"link-zero.json", "a symbolic link", func(p string) error { return os.Symlink("/dev/zero", p) }},
		{"fifo.json", "a FIFO", func(p string) error { return syscall.Mkfifo(p, 0o660) }},
		{"dir.json", "a directory", func(p string) error { return os.Mkdir(p, 0o770) }},
		{"big.json", "bytes; a message may have at most", func(p string) error { return os.WriteFile(p, big, 0o640) }},
		{"justover.json", "bytes; a message may have at most", func(p string) error { return os.WriteFile(p, justOver, 0o640) }},
		{"latin1.json", "not UTF-8", func(p string) error { return os.WriteFile(p, []byte("{\"name\":\"Caf\xe9\"}"), 0o640) }},
		{"broken.json", "not valid JSON", func(p string) error { return os.WriteFile(p, []byte(`{"a":`), 0o640) }},
	}
	// Before the agent starts (found by the first scan) and after (found
	// by the watcher).
	for _, c := range cases[:4] {
		if err := c.make(filepath.Join(spool, "pre-"+c.name)); err != nil {
			t.Fatal(err)
		}
	}
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	for _, c := range cases {
		if err := c.make(filepath.Join(spool, c.name)); err != nil {
			t.Fatal(err)
		}
	}
	spoolPut(t, spool, "good.json", []byte(`{"good":1}`))
	testenv.Eventually(t, 20*time.Second, "the good message behind the refused ones", func() bool {
		return len(bodiesWith(az, "gw-spool-refuse", "good")) == 1
	})
	all := append([]bad{}, cases...)
	for _, c := range cases[:4] {
		all = append(all, bad{"pre-" + c.name, c.reason, nil})
	}
	testenv.Eventually(t, 20*time.Second, "every bad file moved to rejected/", func() bool {
		for _, c := range all {
			if _, err := os.Lstat(filepath.Join(spool, "rejected", c.name)); err != nil {
				return false
			}
		}
		return true
	})
	for _, c := range all {
		if _, err := os.Lstat(filepath.Join(spool, c.name)); err == nil {
			t.Errorf("%s still in the spool directory", c.name)
		}
		var warned []string
		for _, line := range strings.Split(r.log.String(), "\n") {
			if strings.Contains(line, "spool file refused") && strings.Contains(line, "/"+c.name+" ") {
				warned = append(warned, line)
			}
		}
		if len(warned) != 1 {
			t.Errorf("%s: %d warnings, want exactly one:\n%s", c.name, len(warned), strings.Join(warned, "\n"))
		} else if !strings.Contains(warned[0], c.reason) {
			t.Errorf("%s: warning does not say %q: %s", c.name, c.reason, warned[0])
		}
	}
	for _, m := range received(az, "gw-spool-refuse", "") {
		if s := fmt.Sprint(m["body"]); strings.Contains(s, "s3cr3t") || strings.Contains(s, "big") || strings.Contains(s, "Caf") {
			t.Fatalf("a refused file reached the hub: %v", s)
		}
	}
	if _, err := os.Stat(secret); err != nil {
		t.Fatalf("the link's target was touched: %v", err)
	}
	want := int64(len(all))
	testenv.Eventually(t, 10*time.Second, "the count in status", func() bool { return d.status().SpoolRejected == want })
	cfg, _ := os.ReadFile(d.path)
	os.WriteFile(d.path, bytes.Replace(cfg, []byte(`interval = "1h"`), []byte(`interval = "1s"`), 1), 0o600)
	testenv.Eventually(t, 10*time.Second, "the count in a health message", func() bool {
		for _, m := range received(az, "gw-spool-refuse", "health") {
			if b, ok := m["body"].(map[string]any); ok && b["spoolRejected"] == float64(want) {
				return true
			}
		}
		return false
	})
	r.stop() // a FIFO must not block the shutdown either
}

// An application that keeps rewriting the same broken data.json (one
// write every ten seconds would be 8,640 refused files a day) cannot fill
// the disk through rejected/: the agent keeps the newest
// telemetry.RejectedKeep there, removes older ones, and counts them in
// status and health; good messages keep flowing.
func TestSpoolRejectedBounded(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-spool-bounded", symmetric: true})
	spool := d.cfg.Telemetry.SpoolDir
	if err := os.MkdirAll(spool, 0o770); err != nil {
		t.Fatal(err)
	}
	d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	const extra = 25
	n := telemetry.RejectedKeep + extra
	for i := range n {
		spoolPut(t, spool, "data.json", []byte(fmt.Sprintf(`{"broken":%d,`, i)))
		testenv.Eventually(t, 10*time.Second, "the broken file refused", func() bool {
			_, err := os.Lstat(filepath.Join(spool, "data.json"))
			return os.IsNotExist(err)
		})
	}
	spoolPut(t, spool, "good.json", []byte(`{"goodAfterBroken":1}`))
	testenv.Eventually(t, 20*time.Second, "rejected/ bounded, the removed files counted in status", func() bool {
		ents, _ := os.ReadDir(filepath.Join(spool, "rejected"))
		st := d.status()
		return len(ents) == telemetry.RejectedKeep && st.SpoolRejected == int64(n) && st.SpoolRejectedRemoved == extra
	})
	testenv.Eventually(t, 20*time.Second, "the good message behind them", func() bool {
		return len(bodiesWith(az, "gw-spool-bounded", "goodAfterBroken")) == 1
	})
	cfg, _ := os.ReadFile(d.path)
	os.WriteFile(d.path, bytes.Replace(cfg, []byte(`interval = "1h"`), []byte(`interval = "1s"`), 1), 0o600)
	testenv.Eventually(t, 10*time.Second, "the removed count in a health message", func() bool {
		for _, m := range received(az, "gw-spool-bounded", "health") {
			if b, ok := m["body"].(map[string]any); ok && b["spoolRejectedRemoved"] == float64(extra) {
				return true
			}
		}
		return false
	})
}
