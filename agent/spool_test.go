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

// A file name used again after its message was delivered is a new
// message.
func TestSpoolNameReused(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-spool-reuse", symmetric: true})
	os.MkdirAll(d.cfg.Telemetry.SpoolDir, 0o770)
	d.start()
	p := filepath.Join(d.cfg.Telemetry.SpoolDir, "m.json")
	for i := 1; i <= 3; i++ {
		spoolPut(t, d.cfg.Telemetry.SpoolDir, "m.json", []byte(fmt.Sprintf(`{"reused":%d}`, i)))
		testenv.Eventually(t, 20*time.Second, fmt.Sprintf("message %d delivered and its file deleted", i), func() bool {
			_, err := os.Lstat(p)
			return len(bodiesWith(az, "gw-spool-reuse", "reused")) == i && os.IsNotExist(err)
		})
	}
	// The same content again is a new message too, with a new id.
	spoolPut(t, d.cfg.Telemetry.SpoolDir, "m.json", []byte(`{"reused":3}`))
	testenv.Eventually(t, 20*time.Second, "the repeated content delivered again", func() bool {
		return len(bodiesWith(az, "gw-spool-reuse", "reused")) == 4
	})
	ids := map[any]bool{}
	for _, m := range received(az, "gw-spool-reuse", "") {
		props, _ := m["properties"].(map[string]any)
		sys, _ := props["system"].(map[string]any)
		if b, ok := m["body"].(map[string]any); ok && b["reused"] != nil {
			if sys["$.mid"] == nil || ids[sys["$.mid"]] {
				t.Fatalf("message id %v used twice", sys["$.mid"])
			}
			ids[sys["$.mid"]] = true
		}
	}
}

// A file written in place in two chunks is sent whole: the agent waits
// until it has been unchanged for spool_settle. With a settle time of an
// hour, the half-written file cannot be sent during the test; once its
// modification time is older than that, the whole file is.
func TestSpoolHalfWrittenFile(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-spool-half", symmetric: true, extra: "spool_settle = \"1h\"\n"})
	os.MkdirAll(d.cfg.Telemetry.SpoolDir, 0o770)
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	p := filepath.Join(d.cfg.Telemetry.SpoolDir, "counter.json")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o640)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("12")
	f.Sync()
	// A renamed file written long ago is sent at once, so the agent has
	// certainly looked at the spool after the first chunk.
	old := filepath.Join(d.cfg.Telemetry.SpoolDir, ".old.tmp")
	os.WriteFile(old, []byte(`{"old":1}`), 0o640)
	past := time.Now().Add(-2 * time.Hour)
	os.Chtimes(old, past, past)
	os.Rename(old, filepath.Join(d.cfg.Telemetry.SpoolDir, "old.json"))
	testenv.Eventually(t, 20*time.Second, "the settled file", func() bool { return len(bodiesWith(az, "gw-spool-half", "old")) == 1 })
	f.WriteString("34")
	f.Close()
	os.Chtimes(p, past, past) // as if an hour had passed
	testenv.Eventually(t, 20*time.Second, "the whole file", func() bool {
		for _, m := range received(az, "gw-spool-half", "") {
			if m["body"] == float64(1234) {
				return true
			}
		}
		return false
	})
	for _, m := range received(az, "gw-spool-half", "") {
		if m["body"] == float64(12) {
			t.Fatalf("the half-written file was sent")
		}
	}
	if !strings.Contains(r.log.String(), "spool file queued") {
		t.Fatal("no spool log")
	}
}
