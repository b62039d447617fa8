package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// The shipped layout, for real: systemd-sysusers and systemd-tmpfiles apply
// systemd/gwagent.{sysusers,tmpfiles} to a scratch root; the agent runs as
// the gwagent uid they allocated, and a local application runs as another
// unprivileged uid in group gwagent-spool (setpriv). The application can
// write the spool but cannot read the state directory; its message reaches
// the hub; one member of no group can write nothing. Applications cannot
// delete or replace each other's messages (the spool is sticky), yet the
// agent delivers and moves them all; a file made readable while it is
// being written is sent.
func TestSpoolLayoutWithRealUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("NEEDS ROOT: switching to unprivileged uids with setpriv (make test runs as root in CI)")
	}
	setpriv := testenv.LookPath(t, "setpriv", "util-linux")
	sysusers := testenv.LookPath(t, "systemd-sysusers", "systemd")
	tmpfiles := testenv.LookPath(t, "systemd-tmpfiles", "systemd")

	root := t.TempDir()
	for p := root; p != os.TempDir() && p != "/"; p = filepath.Dir(p) {
		os.Chmod(p, 0o755) // let the unprivileged uids walk down to it
	}
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	for _, f := range []string{"passwd", "group", "shadow", "gshadow"} {
		os.WriteFile(filepath.Join(root, "etc", f), nil, 0o644)
	}
	abs := func(p string) string { a, _ := filepath.Abs(p); return a }
	for _, c := range [][]string{
		{sysusers, "--root=" + root, abs("../../systemd/gwagent.sysusers")},
		{tmpfiles, "--create", "--root=" + root, abs("../../systemd/gwagent.tmpfiles")},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", filepath.Base(c[0]), err, out)
		}
	}
	uid, gid := idOf(t, filepath.Join(root, "etc/passwd"), "gwagent")
	spoolGID, _ := idOf(t, filepath.Join(root, "etc/group"), "gwagent-spool")
	state := filepath.Join(root, "var/lib/gwagent")
	spool := filepath.Join(root, "var/spool/gwagent")
	etc := filepath.Join(root, "etc/gwagent")

	// The agent's files, owned as an installer would leave them.
	az := azsimtest.Start(t, azsim.Config{})
	var k struct{ DeviceKey string }
	az.Admin("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId=gw-layout", nil, &k)
	copyFile(t, az.Info.TrustBundle, filepath.Join(etc, "roots.pem"), 0o644)
	os.WriteFile(filepath.Join(etc, "dps-key"), []byte(k.DeviceKey), 0o600)
	os.Chown(filepath.Join(etc, "dps-key"), uid, gid)
	cfg := filepath.Join(etc, "gwagent.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`state_dir = %q
trust_bundle = "roots.pem"
[identity]
id_scope = %q
registration_id = "gw-layout"
dps_endpoint = %q
[onboarding]
kind = "symmetric_key"
symmetric_key_file = "dps-key"
[operational]
key = "file:%s/device.key"
[telemetry]
interval = "1h"
spool_dir = %q
`, state, az.Info.IDScope, az.Info.DPSAddr, state, spool)), 0o640)
	os.Chown(cfg, 0, gid)
	bin := filepath.Join(root, "gwagent.test")
	copyFile(t, os.Args[0], bin, 0o755)

	// The applications: unprivileged uids in group gwagent-spool only.
	const appUID, appBUID = 61234, 61236
	runAs := func(uid int, script string) (string, error) {
		out, err := exec.Command(setpriv, "--reuid="+strconv.Itoa(uid), "--regid="+strconv.Itoa(uid),
			"--groups="+strconv.Itoa(spoolGID), "--inh-caps=-all", "--bounding-set=-all", "--",
			"sh", "-c", "umask 027; "+script).CombinedOutput()
		return string(out), err
	}
	app := func(script string) (string, error) { return runAs(appUID, script) }
	if out, err := app(fmt.Sprintf(`printf '{"fromApp":1}' > %s/.m.tmp && mv %s/.m.tmp %s/m.json`, spool, spool, spool)); err != nil {
		t.Fatalf("a member of gwagent-spool cannot write the spool: %v\n%s", err, out)
	}
	// Application B's messages wait in the spool (the agent is not running
	// yet). Application A, in the same group, can neither delete them nor
	// replace one with its own content: the spool is sticky.
	for i := 1; i <= 2; i++ {
		if out, err := runAs(appBUID, fmt.Sprintf(`printf '{"fromB":%d}' > %s/.b.tmp && mv %s/.b.tmp %s/b%d.json`, i, spool, spool, spool, i)); err != nil {
			t.Fatalf("application B cannot write the spool: %v\n%s", err, out)
		}
	}
	for _, attack := range []string{
		"rm -f " + spool + "/b1.json",
		fmt.Sprintf(`printf '{"fromB":"forged"}' > %s/.f.tmp && mv -f %s/.f.tmp %s/b2.json`, spool, spool, spool),
		"mv -f " + spool + "/b1.json " + spool + "/mine.json",
	} {
		if out, err := app(attack); err == nil {
			t.Errorf("application A could %q on B's message:\n%s", attack, out)
		}
	}
	for i := 1; i <= 2; i++ {
		if b, err := os.ReadFile(filepath.Join(spool, fmt.Sprintf("b%d.json", i))); err != nil || string(b) != fmt.Sprintf(`{"fromB":%d}`, i) {
			t.Fatalf("B's message b%d.json after A's attempts: %q, %v", i, b, err)
		}
	}
	for _, probe := range []string{"ls " + state, "cat " + filepath.Join(state, "gwagent.lock"), "touch " + filepath.Join(state, "x")} {
		if out, err := app(probe); err == nil {
			t.Fatalf("the application could %q in the state directory:\n%s", probe, out)
		}
	}
	out, err := exec.Command(setpriv, "--reuid=61235", "--regid=61235", "--clear-groups", "--", "sh", "-c",
		"printf '{}' > "+spool+"/outsider.json").CombinedOutput()
	if err == nil {
		t.Fatalf("a user outside gwagent-spool wrote the spool:\n%s", out)
	}

	// A command run as root first (the factory's `gwagent onboard`, an
	// admin's `gwagent provision`) takes the state lock too; the service
	// must still be able to take it afterwards.
	if _, _, err := gw(t, "provision", "--config", cfg); err != nil {
		t.Fatalf("provision as root: %v", err)
	}
	exec.Command("chown", "-R", fmt.Sprintf("%d:%d", uid, gid), state).Run() // as an installer would fix the keys it made
	os.Chown(filepath.Join(state, "gwagent.lock"), 0, 0)                     // but not the lock: the agent copes
	if st, _ := os.Stat(filepath.Join(state, "gwagent.lock")); st == nil || st.Mode().Perm() != 0o644 {
		t.Fatalf("lock file mode %v, want 0644 so that any user running gwagent can lock it", st)
	}

	// The agent as the gwagent uid with its supplementary group, as the unit
	// runs it.
	logPath := filepath.Join(t.TempDir(), "agent.log")
	logf, _ := os.Create(logPath)
	cmd := exec.Command(setpriv, "--reuid="+strconv.Itoa(uid), "--regid="+strconv.Itoa(gid),
		"--groups="+strconv.Itoa(spoolGID), "--inh-caps=-all", "--bounding-set=-all", "--", bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), "GWAGENT_TEST_EXEC=run\n--config\n"+cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); logf.Close() })
	agentLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent log:\n%s", agentLog())
		}
	})
	testenv.Eventually(t, 30*time.Second, "the application's message at the hub", func() bool {
		for _, m := range az.Telemetry() {
			if b, ok := m["body"].(map[string]any); ok && m["deviceId"] == "gw-layout" && b["fromApp"] != nil {
				return true
			}
		}
		return false
	})
	testenv.Eventually(t, 10*time.Second, "the file deleted after the PUBACK", func() bool {
		_, err := os.Lstat(filepath.Join(spool, "m.json"))
		return os.IsNotExist(err)
	})
	// B's messages arrive as B wrote them, and the agent, owner of the
	// sticky directory, can still take B's files out of the spool.
	testenv.Eventually(t, 20*time.Second, "B's messages at the hub, their files gone", func() bool {
		got := map[any]bool{}
		for _, m := range az.Telemetry() {
			if b, ok := m["body"].(map[string]any); ok && m["deviceId"] == "gw-layout" && b["fromB"] != nil {
				got[b["fromB"]] = true
			}
		}
		_, err1 := os.Lstat(filepath.Join(spool, "b1.json"))
		_, err2 := os.Lstat(filepath.Join(spool, "b2.json"))
		return len(got) == 2 && got[float64(1)] && got[float64(2)] && os.IsNotExist(err1) && os.IsNotExist(err2)
	})
	// A file created unreadable in place and made readable while it is
	// being written (within the settle time) is sent, not refused.
	if out, err := app(fmt.Sprintf(`umask 077; printf '{"chmodded":' > %s/late.json; sleep 0.4; printf '1}' >> %s/late.json; chmod 640 %s/late.json`, spool, spool, spool)); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	testenv.Eventually(t, 20*time.Second, "the file made readable while written, sent", func() bool {
		for _, m := range az.Telemetry() {
			if b, ok := m["body"].(map[string]any); ok && m["deviceId"] == "gw-layout" && b["chmodded"] != nil {
				return true
			}
		}
		return false
	})
	if _, err := os.Lstat(filepath.Join(spool, "rejected", "late.json")); err == nil || strings.Contains(agentLog(), "late.json reason") {
		t.Fatalf("the file made readable within the settle time was refused:\n%s", agentLog())
	}
	// A file the agent may not read (the application's umask was 077) is
	// moved aside with the reason.
	if out, err := app(fmt.Sprintf(`umask 077; printf '{"private":1}' > %s/.p.tmp && mv %s/.p.tmp %s/private.json`, spool, spool, spool)); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	testenv.Eventually(t, 10*time.Second, "the unreadable file moved to rejected/", func() bool {
		_, err := os.Lstat(filepath.Join(spool, "rejected", "private.json"))
		return err == nil && strings.Contains(agentLog(), "not readable by the agent")
	})
	// rejected/ is the agent's: applications may look, not plant or delete.
	if out, err := app("ls " + spool + "/rejected"); err != nil || !strings.Contains(out, "private.json") {
		t.Errorf("the application cannot see its refused file: %v\n%s", err, out)
	}
	for _, attack := range []string{"rm -f " + spool + "/rejected/private.json", "touch " + spool + "/rejected/planted"} {
		if out, err := runAs(appBUID, attack); err == nil {
			t.Errorf("application B could %q in rejected/:\n%s", attack, out)
		}
	}
	status, _, err := gw(t, "status", "--config", cfg)
	if err != nil || !strings.Contains(status, "connected (updated") {
		t.Fatalf("status as root beside the service: %v\n%s", err, status)
	}
	if st, err := os.Stat(state); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state directory mode changed: %v %v", st.Mode(), err)
	}
}

// idOf reads the numeric id of name from a passwd or group file.
func idOf(t *testing.T, file, name string) (id, gid int) {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Split(sc.Text(), ":")
		if len(fs) >= 3 && fs[0] == name {
			id, _ = strconv.Atoi(fs[2])
			if len(fs) >= 4 {
				gid, _ = strconv.Atoi(fs[3])
			}
			return id, gid
		}
	}
	t.Fatalf("%s not in %s", name, file)
	return 0, 0
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	os.Chmod(to, mode)
}
