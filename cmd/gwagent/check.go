package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/clocksync"
	"github.com/gwagent/gwagent/internal/mounts"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

// Check outcomes, as `gwagent check --json` reports them.
const (
	checkOK      = "ok"
	checkWarning = "warning"
	checkError   = "error"
	checkSkipped = "skipped"
)

// checkResult is one line of `gwagent check`: what was checked, how it went,
// and for a warning or error what to do about it.
type checkResult struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
	Hint    string `json:"hint,omitempty"`
}

// checker runs the checks. Its fields are the outside world, so tests can
// put the clock in 1970 or give the host a systemd that says "failed".
type checker struct {
	cfgPath   string
	now       time.Time
	buildTime time.Time
	timeout   time.Duration
	// clockSync says what vouches for the clock (NTP, an RTC); nil skips.
	clockSync func(now time.Time) clocksync.Reading
	// systemctl runs systemctl with args and returns its trimmed stdout; nil
	// when the host does not run systemd.
	systemctl func(ctx context.Context, args ...string) (string, error)
	// serviceUser and spoolGroup are the names the package creates.
	serviceUser, spoolGroup string
	// mountTable is the kernel's mount table (mounts.Table); "" skips the
	// spool's file-system check.
	mountTable string

	cfg     *agent.Config
	keys    *agent.Keys
	id      *provisioning.Identity
	results []checkResult
}

func (c *checker) add(name, status, msg, hint string) {
	c.results = append(c.results, checkResult{Name: name, Status: status, Message: msg, Hint: hint})
}

func cmdCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("check", "[--config FILE] [--json] [--timeout D]", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file")
	asJSON := fs.Bool("json", false, "print the results as JSON (for fleet tooling)")
	timeout := fs.Duration("timeout", 10*time.Second, "bound for each network step (DNS, TCP, TLS)")
	if err := parse(fs, args); err != nil {
		return err
	}
	bt, _ := time.Parse(time.RFC3339, buildTime)
	c := &checker{cfgPath: *cfgPath, now: clock.Real{}.Now(), buildTime: bt, timeout: *timeout,
		clockSync: clocksync.System().Read, serviceUser: "gwagent", spoolGroup: "gwagent-spool", mountTable: mounts.Table}
	if st, err := os.Stat("/run/systemd/system"); err == nil && st.IsDir() {
		c.systemctl = runSystemctl
	}
	c.run(ctx)
	return c.report(stdout, *asJSON)
}

// report prints the results and fails when any check failed.
func (c *checker) report(w io.Writer, asJSON bool) error {
	n := map[string]int{}
	for _, r := range c.results {
		n[r.Status]++
	}
	if asJSON {
		out := struct {
			Config  string         `json:"config"`
			OK      bool           `json:"ok"`
			Checks  []checkResult  `json:"checks"`
			Summary map[string]int `json:"summary"`
		}{c.cfgPath, n[checkError] == 0, c.results, n}
		b, _ := json.MarshalIndent(out, "", "  ")
		fmt.Fprintf(w, "%s\n", b)
	} else {
		fmt.Fprintf(w, "gwagent check (config %s)\n\n", c.cfgPath)
		for _, r := range c.results {
			fmt.Fprintf(w, "  %-8s %-22s %s\n", r.Status, r.Name, r.Message)
			if r.Hint != "" {
				fmt.Fprintf(w, "  %-8s %-22s hint: %s\n", "", "", r.Hint)
			}
		}
		fmt.Fprintf(w, "\n%d ok, %d warning(s), %d error(s), %d skipped\n", n[checkOK], n[checkWarning], n[checkError], n[checkSkipped])
	}
	if n[checkError] > 0 {
		return fmt.Errorf("check: %d check(s) failed; see the hints above", n[checkError])
	}
	return nil
}

func (c *checker) run(ctx context.Context) {
	cfg, err := agent.LoadConfig(c.cfgPath)
	if err != nil {
		hint := "fix the file (configs/gwagent.toml in the source, /usr/share/doc/gwagent/examples in the package, is the commented example)"
		if errors.Is(err, fs.ErrNotExist) {
			hint = "install a config: cp /usr/share/doc/gwagent/examples/gwagent.toml " + c.cfgPath + ", then set id_scope, registration_id and the keys"
		}
		c.add("config", checkError, err.Error(), hint)
		return
	}
	c.cfg = cfg
	c.add("config", checkOK, "parses and validates", "")
	c.keys = agent.NewKeys()
	defer c.keys.Close()

	c.checkClock()
	c.checkStateDir()
	c.checkSpoolDir()
	c.checkSpoolFS()
	c.checkOnboarding(ctx)
	c.checkIdentity(ctx)
	c.checkTrustBundle()
	dps := c.cfg.Identity.DPSEndpoint
	if _, _, err := net.SplitHostPort(dps); err != nil && cfg.Onboarding.Kind == agent.OnboardingTPM {
		dps = net.JoinHostPort(dps, "443") // TPM attestation speaks HTTPS to DPS
	}
	c.checkNetwork(ctx, "dps", dps)
	switch {
	case cfg.Static():
		c.checkNetwork(ctx, "hub", cfg.Hub.Host)
	case c.id != nil:
		c.checkNetwork(ctx, "hub", c.id.AssignedHub)
	default:
		c.add("hub", checkSkipped, "no hub assigned yet (not provisioned)", "")
	}
	c.checkService(ctx)
	c.checkHubLimits()
}

// Hints for the hub's limits: what an operator can do when the hub's daily
// quota is used up, or when its send throttle slows the gateway down.
const (
	quotaHint = "the hub's daily message quota (shared by all its devices) is used up: it takes no telemetry until 00:00 UTC, " +
		"and the agent tries one message every 10-15 min and just after 00:00 UTC; nothing is lost meanwhile. To get more: " +
		"raise the hub's units or tier (Azure portal: the IoT hub, Pricing and scale; or Set-AzIotHub -SkuName S1 -Units 2), or wait for 00:00 UTC; " +
		"spend less: set [telemetry] pack = true on gateways with small readings (one 4 KB quota chunk then carries about 30 readings of 100 bytes instead of one), " +
		"lower the rates (how often applications write spool files, [telemetry] interval or the twin's telemetryInterval for health messages); " +
		"the hub's metric \"Total number of messages used\" shows the day's use"
	throttleHint = "the hub's device-to-cloud rate (S1: 100 messages/s per hub, whatever the number of devices) is shared by the fleet: " +
		"the agent slows down by itself and speeds up again; to drain faster, lower [telemetry] max_rate on the other gateways, set pack = true, " +
		"or raise the hub's units or tier"
)

// checkHubLimits reads what the running agent saw of the hub's daily quota
// and send throttle (status conditions) and says what can be done.
func (c *checker) checkHubLimits() {
	st, err := agent.ReadStatus(c.cfg.StateDir)
	if err != nil {
		c.add("hub-limits", checkSkipped, "no status from the agent yet", "")
		return
	}
	t := c.cfg.Telemetry
	sending := fmt.Sprintf("send budget %.3g messages/s", t.Rate())
	if t.Rate() == 0 {
		sending = "no send budget (max_rate = 0)"
	}
	if t.Pack {
		sending += fmt.Sprintf(", packing up to %d bytes", t.PackBytes)
	} else {
		sending += ", packing off"
	}
	if reason, ok := st.Conditions[agent.CondHubQuota]; ok {
		c.add("hub-limits", checkWarning, string(agent.CondHubQuota)+": "+reason, quotaHint)
		return
	}
	if reason, ok := st.Conditions[agent.CondSendSlowed]; ok {
		c.add("hub-limits", checkWarning, string(agent.CondSendSlowed)+": "+reason, throttleHint)
		return
	}
	c.add("hub-limits", checkOK, "the hub takes the gateway's messages as they come ("+sending+")", "")
}

// clockFloor is a date before which no gateway running this build can be.
var clockFloor = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

func (c *checker) checkClock() {
	floor := clockFloor
	if c.buildTime.After(floor) {
		floor = c.buildTime
	}
	const hint = "enable time synchronisation (timedatectl set-ntp true, or systemd-timesyncd/chrony) and let it reach an NTP server; certificates cannot be verified before that"
	if c.now.Before(floor) {
		c.add("clock", checkError, fmt.Sprintf("clock says %s, before %s (this build); the clock is wrong", c.now.UTC().Format(time.RFC3339), floor.Format(time.RFC3339)), hint)
		return
	}
	if c.clockSync != nil {
		r := c.clockSync(c.now)
		if r.Source == clocksync.None {
			msg := fmt.Sprintf("%s is plausible, but %s", c.now.UTC().Format(time.RFC3339), r.Detail)
			if r.Client == "" {
				msg += " (no NTP client runs)"
			}
			c.add("clock", checkWarning, msg, hint)
			return
		}
		c.add("clock", checkOK, fmt.Sprintf("%s (%s)", c.now.UTC().Format(time.RFC3339), r.Detail), "")
		return
	}
	c.add("clock", checkOK, c.now.UTC().Format(time.RFC3339), "")
}

func (c *checker) checkStateDir() {
	dir := c.cfg.StateDir
	st, err := os.Lstat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		c.add("state-dir", checkError, dir+" does not exist", "reinstall the package or run `systemd-tmpfiles --create gwagent.conf` (the service creates it through StateDirectory=)")
		return
	case err != nil:
		c.add("state-dir", checkError, err.Error(), "run gwagent check as root or as the service user")
		return
	case st.Mode()&fs.ModeSymlink != 0:
		c.add("state-dir", checkError, dir+" is a symbolic link", "make it a real directory owned by the service user, mode 0700; a link lets whoever controls its target read the keys")
		return
	case !st.IsDir():
		c.add("state-dir", checkError, dir+" is not a directory", "remove it and reinstall the package")
		return
	}
	if p := st.Mode().Perm(); p&0o077 != 0 {
		c.add("state-dir", checkError, fmt.Sprintf("%s has mode %04o: other users can read keys and certificates", dir, p), "chmod 700 "+dir)
		return
	}
	if msg := c.ownedBy(st, c.serviceUser, ""); msg != "" {
		c.add("state-dir", checkError, dir+": "+msg, fmt.Sprintf("chown -R %s: %s", c.serviceUser, dir))
		return
	}
	if msg := c.foreignState(dir); msg != "" {
		c.add("state-dir", checkError, msg, fmt.Sprintf("chown -R %s: %s (a gwagent command run as root by an older version, or a file copied in by hand)", c.serviceUser, dir))
		return
	}
	c.add("state-dir", checkOK, fmt.Sprintf("%s mode %04o", dir, st.Mode().Perm()), "")
}

// foreignState says which files and directories in the state directory
// belong to someone other than the service user (who then cannot read or
// replace them: keys, chains, identity), "" if none or if the user does not
// exist on this host. It looks at 10000 entries at most.
func (c *checker) foreignState(dir string) string {
	uid, ok := userID(c.serviceUser)
	if !ok {
		return ""
	}
	var bad []string
	n, seen := 0, 0
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if seen++; seen > 10000 {
			return filepath.SkipAll
		}
		if err != nil {
			n++
			bad = append(bad, fmt.Sprintf("%s (unreadable: %v)", p, err))
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		if sys, ok := info.Sys().(*syscall.Stat_t); ok && strconv.Itoa(int(sys.Uid)) != uid {
			n++
			owner := strconv.Itoa(int(sys.Uid))
			if name, ok := userName(owner); ok {
				owner = name
			}
			bad = append(bad, fmt.Sprintf("%s (owner %s)", p, owner))
		}
		return nil
	})
	if n == 0 {
		return ""
	}
	if len(bad) > 3 {
		bad = append(bad[:3], "...")
	}
	return fmt.Sprintf("%d file(s) in %s are not the service user %s's, so the service cannot read or replace them: %s", n, dir, c.serviceUser, strings.Join(bad, ", "))
}

// ownedBy says what is wrong when st is not owned by user (and group, if
// not empty); "" if it is, or if the names do not exist on this host (a
// development machine runs everything as one user).
func (c *checker) ownedBy(st fs.FileInfo, user, group string) string {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	if uid, ok := userID(user); ok && strconv.Itoa(int(sys.Uid)) != uid {
		return fmt.Sprintf("owned by uid %d, not by the service user %s (uid %s)", sys.Uid, user, uid)
	}
	if group != "" {
		if gid, ok := groupID(group); ok && strconv.Itoa(int(sys.Gid)) != gid {
			return fmt.Sprintf("group is gid %d, not %s (gid %s)", sys.Gid, group, gid)
		}
	}
	return ""
}

func (c *checker) checkSpoolDir() {
	dir := c.cfg.Telemetry.SpoolDir
	st, err := os.Lstat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		c.add("spool-dir", checkWarning, dir+" does not exist; local applications cannot send messages yet", "the service creates it at start; or run `systemd-tmpfiles --create gwagent.conf`")
		return
	case err != nil:
		c.add("spool-dir", checkError, err.Error(), "run gwagent check as root or as the service user")
		return
	case st.Mode()&fs.ModeSymlink != 0 || !st.IsDir():
		c.add("spool-dir", checkError, dir+" is not a directory (a symbolic link or a file)", "make it a real directory: mode 3770, owner "+c.serviceUser+", group "+c.spoolGroup)
		return
	}
	p := st.Mode().Perm()
	if p&0o002 != 0 {
		c.add("spool-dir", checkError, fmt.Sprintf("%s has mode %04o: any local user can send messages as this device", dir, p), fmt.Sprintf("chmod 3770 %s; add applications to group %s", dir, c.spoolGroup))
		return
	}
	if msg := c.ownedBy(st, c.serviceUser, c.spoolGroup); msg != "" {
		c.add("spool-dir", checkWarning, dir+": "+msg, fmt.Sprintf("chown %s:%s %s", c.serviceUser, c.spoolGroup, dir))
		return
	}
	if p&0o070 != 0o070 {
		c.add("spool-dir", checkWarning, fmt.Sprintf("%s has mode %04o: applications in the spool group cannot drop messages", dir, p), "chmod 3770 "+dir)
		return
	}
	mode := uint32(p)
	if st.Mode()&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if st.Mode()&fs.ModeSticky == 0 {
		// Without it any member of the group can delete another
		// application's pending file, or replace it with its own content
		// that then arrives as the other's.
		c.add("spool-dir", checkWarning, fmt.Sprintf("%s has mode %04o without the sticky bit: applications in the spool group can delete or replace each other's messages", dir, mode),
			"chmod 3770 "+dir+" (or systemd-tmpfiles --create gwagent.conf)")
		return
	}
	mode |= 0o1000
	c.add("spool-dir", checkOK, fmt.Sprintf("%s mode %04o", dir, mode), "")
}

// checkSpoolFS looks at the mount options of the spool's file system.
// Every delivered message deletes its spool file; with online discard each
// delete waits for a TRIM of the file's blocks, which on eMMC and SD cards
// can take longer than sending the message.
func (c *checker) checkSpoolFS() {
	dir := c.cfg.Telemetry.SpoolDir
	if c.mountTable == "" {
		c.add("spool-fs", checkSkipped, "no mount table to read", "")
		return
	}
	resolved, err := filepath.EvalSymlinks(dir)
	if err != nil {
		// The spool may not exist yet (spool-dir says so): judge the
		// file system it will be made on.
		resolved, err = filepath.EvalSymlinks(filepath.Dir(dir))
	}
	if err != nil {
		c.add("spool-fs", checkSkipped, "cannot resolve "+dir+": "+err.Error(), "")
		return
	}
	m, err := mounts.Of(c.mountTable, resolved)
	if err != nil {
		c.add("spool-fs", checkSkipped, err.Error(), "")
		return
	}
	if m.Has("discard") || m.Has("discard=sync") {
		c.add("spool-fs", checkWarning, fmt.Sprintf("%s is on %s, mounted with online discard: each delivered message's file is trimmed as it is deleted, which costs CPU and flash time per message", dir, m),
			fmt.Sprintf("remove discard from the options of %s in /etc/fstab and trim weekly instead: systemctl enable --now fstrim.timer", m.Point))
		return
	}
	if m.Has("ro") {
		c.add("spool-fs", checkError, fmt.Sprintf("%s is on %s, mounted read-only: applications cannot drop messages and the agent cannot delete delivered ones", dir, m),
			"if the kernel remounted it read-only after an error (errors=remount-ro), dmesg says why: repair it (fsck); else put spool_dir on a writable file system")
		return
	}
	c.add("spool-fs", checkOK, fmt.Sprintf("%s on %s %s", dir, m.Type, m.Point), "")
}

// azureRoot is a root CA Azure's DPS and IoT Hub chain to (Azure's TLS
// certificate change notes). The fingerprints are SHA-256 of the whole
// certificate, as Debian's ca-certificates ships it.
type azureRoot struct {
	name, sha256 string
	required     bool // in use today; the others are Azure's announced next roots
}

var azureRoots = []azureRoot{
	{"DigiCert Global Root G2", "cb3ccbb76031e5e0138f8dd39a23f9de47ffc35e43c1144cea27d46a5ab1cb5f", true},
	{"Microsoft RSA Root Certificate Authority 2017", "c741f70f4b2a8d88bf2e71c14122ef53ef10eba0cfa5e64cfa20f418853073e0", false},
	{"Microsoft ECC Root Certificate Authority 2017", "358df39d764af9e1b766e9c972df352ee15cfac227af6ad1d70e8e4a6edcba02", false},
}

// isAzure reports whether host:port is one of Azure's IoT names.
func isAzure(hostport string) bool {
	h := hostport
	if x, _, err := net.SplitHostPort(hostport); err == nil {
		h = x
	}
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	return strings.HasSuffix(h, ".azure-devices-provisioning.net") || strings.HasSuffix(h, ".azure-devices.net")
}

func (c *checker) checkTrustBundle() {
	path := c.cfg.TrustBundle
	b, err := os.ReadFile(path)
	if err != nil {
		c.add("trust-bundle", checkError, err.Error(), "install the CA file the config's trust_bundle names (the package ships /etc/gwagent/azure-roots.pem)")
		return
	}
	have := map[string]bool{}
	var n int
	var expired []string
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		cert, err := x509.ParseCertificate(blk.Bytes)
		if blk.Type != "CERTIFICATE" || err != nil {
			continue
		}
		n++
		sum := sha256.Sum256(cert.Raw)
		have[fmt.Sprintf("%x", sum)] = true
		if c.now.After(cert.NotAfter) {
			expired = append(expired, cert.Subject.CommonName)
		}
	}
	if n == 0 {
		c.add("trust-bundle", checkError, path+" holds no PEM certificate", "put the PEM CA certificates that sign DPS's and the hub's server certificates there")
		return
	}
	azure := isAzure(c.cfg.Identity.DPSEndpoint) || isAzure(c.cfg.Hub.Host) || (c.id != nil && isAzure(c.id.AssignedHub))
	var missingReq, missingNext []string
	for _, r := range azureRoots {
		if !have[r.sha256] {
			if r.required {
				missingReq = append(missingReq, r.name)
			} else {
				missingNext = append(missingNext, r.name)
			}
		}
	}
	const hint = "add Azure's roots from Debian's ca-certificates (/usr/share/ca-certificates/mozilla/DigiCert_Global_Root_G2.crt, Microsoft_RSA_Root_Certificate_Authority_2017.crt, Microsoft_ECC_Root_Certificate_Authority_2017.crt); the package's /etc/gwagent/azure-roots.pem has them"
	switch {
	case azure && len(missingReq) > 0:
		c.add("trust-bundle", checkError, fmt.Sprintf("%s lacks %s, which signs Azure's DPS and hub certificates today", path, strings.Join(missingReq, ", ")), hint)
	case azure && len(missingNext) > 0:
		c.add("trust-bundle", checkWarning, fmt.Sprintf("%s lacks %s, Azure's announced next roots", path, strings.Join(missingNext, ", ")), hint)
	case len(expired) > 0:
		c.add("trust-bundle", checkWarning, fmt.Sprintf("%s holds expired CA certificates: %s", path, strings.Join(expired, ", ")), "remove or replace them")
	case azure:
		c.add("trust-bundle", checkOK, fmt.Sprintf("%d CA certificates, Azure's roots included", n), "")
	default:
		c.add("trust-bundle", checkOK, fmt.Sprintf("%d CA certificates (endpoints are not Azure's; Azure's roots not required)", n), "")
	}
}

// probeKey proves a signer works and does P-384: it signs a SHA-384 digest
// and verifies the signature with pub (the certificate's key, if known).
func probeKey(s crypto.Signer, pub crypto.PublicKey) error {
	if pub == nil {
		pub = s.Public()
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || !keystore.IsP384(ec) {
		return fmt.Errorf("the key is not ECDSA P-384")
	}
	d := sha512.Sum384([]byte("gwagent check"))
	sig, err := s.Sign(rand.Reader, d[:], crypto.SHA384)
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	if !ecdsa.VerifyASN1(ec, d[:], sig) {
		return errors.New("the key's signature does not verify with the certificate's public key: key and certificate do not match")
	}
	return nil
}

// keyHint says what to do about a key store error.
func keyHint(err error) string {
	switch {
	case errors.Is(err, keystore.ErrDeviceAbsent):
		return "check the TPM (ls -l /dev/tpmrm0: group tss, mode 0660; the service user in group tss) or the token, then restart the service"
	case errors.Is(err, keystore.ErrDeviceBusy):
		return "another process holds the device; use /dev/tpmrm0, not /dev/tpm0"
	case errors.Is(err, keystore.ErrBadPIN):
		return "fix the PIN file the key URI's pin-source names"
	case errors.Is(err, keystore.ErrUnsupportedCurve):
		return "this device cannot do P-384: use a PKCS#11 token or file keys"
	case errors.Is(err, keystore.ErrKeyNotFound):
		return "the key is gone; re-run the factory step or `gwagent provision` (a new key means a new certificate)"
	}
	return "see the error; `gwagent keygen --key URI` tests a key store"
}

func (c *checker) checkOnboarding(ctx context.Context) {
	if c.cfg.Static() {
		c.add("onboarding", checkSkipped, "static mode: no DPS onboarding", "")
		return
	}
	cred, err := agent.OnboardingCredential(ctx, c.cfg, c.keys)
	if err != nil {
		hint := keyHint(err)
		if errors.Is(err, keystore.ErrKeyNotFound) || strings.Contains(err.Error(), "onboarding chain") {
			hint = "run the factory step: gwagent onboard csr, have the factory CA sign it, gwagent onboard install --chain FILE (see README, Running a gateway)"
		}
		c.add("onboarding", checkError, err.Error(), hint)
		return
	}
	var x provisioning.X509Credential
	switch cr := cred.(type) {
	case provisioning.X509Credential:
		x = cr
	case provisioning.TPMCredential:
		c.add("onboarding", checkOK, "TPM attestation: the TPM answers (its endorsement key is the credential)", "")
		return
	default:
		c.add("onboarding", checkOK, "symmetric key readable and well-formed", "")
		return
	}
	leaf := x.Chain[0]
	if err := probeKey(x.Signer, leaf.PublicKey); err != nil {
		c.add("onboarding", checkError, "onboarding key: "+err.Error(), keyHint(err))
		return
	}
	if err := provisioning.CheckValidity(leaf, c.now); err != nil {
		c.add("onboarding", checkError, "onboarding certificate: "+err.Error(), "the factory CA must issue a new onboarding certificate (gwagent onboard csr / install)")
		return
	}
	c.add("onboarding", checkOK, fmt.Sprintf("X.509 CN=%s issued by %q, key works (P-384), valid until %s", leaf.Subject.CommonName, leaf.Issuer.CommonName, leaf.NotAfter.UTC().Format(time.RFC3339)), "")
}

func (c *checker) checkIdentity(ctx context.Context) {
	id, err := currentIdentity(c.cfg.StateDir)
	if errors.Is(err, provisioning.ErrNotProvisioned) {
		c.notProvisioned()
		return
	}
	if err != nil {
		c.add("identity", checkError, err.Error(), "run gwagent check as root or as the service user; if the store is damaged, `gwagent provision` makes a new identity")
		return
	}
	c.id = id
	leaf := id.Leaf()
	u, err := keystore.Parse(id.KeyURI)
	var s crypto.Signer
	if err == nil {
		s, err = c.keys.Signer(ctx, u)
	}
	if err == nil {
		err = probeKey(s, leaf.PublicKey)
	}
	if err != nil {
		c.add("identity", checkError, fmt.Sprintf("operational key for device %s: %v", id.DeviceID, err), keyHint(err))
		return
	}
	c.add("identity", checkOK, fmt.Sprintf("device %s on %s; key %s works (P-384) and matches the certificate", id.DeviceID, id.AssignedHub, u), "")

	const renewHint = "the service renews by itself; `gwagent renew` renews now, `gwagent status` and the log say why it has not"
	left := leaf.NotAfter.Sub(c.now)
	switch {
	case c.now.Before(leaf.NotBefore):
		c.add("certificate", checkError, fmt.Sprintf("serial %s is not valid before %s", id.Serial, leaf.NotBefore.UTC().Format(time.RFC3339)), "the clock is behind; see the clock check")
		return
	case left <= 0:
		c.add("certificate", checkError, fmt.Sprintf("serial %s expired at %s", id.Serial, leaf.NotAfter.UTC().Format(time.RFC3339)), "start the service: an expired certificate is replaced through DPS; or run `gwagent provision`")
		return
	}
	msg := fmt.Sprintf("serial %s valid until %s (%s left)", id.Serial, leaf.NotAfter.UTC().Format(time.RFC3339), left.Round(time.Minute))
	st, err := agent.ReadStatus(c.cfg.StateDir)
	if err == nil && !st.NextRenewal.IsZero() {
		msg += ", next renewal " + st.NextRenewal.UTC().Format(time.RFC3339)
		if st.NextRenewal.Before(c.now.Add(-time.Hour)) {
			c.add("certificate", checkWarning, msg+": overdue", renewHint)
			return
		}
	}
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	if th := c.cfg.Renewal.Threshold; life > 0 && c.now.Sub(leaf.NotBefore) > time.Duration(float64(life)*(th+1)/2) {
		c.add("certificate", checkWarning, msg+": past its renewal point", renewHint)
		return
	}
	c.add("certificate", checkOK, msg, "")
}

func (c *checker) notProvisioned() {
	c.add("identity", checkWarning, "not provisioned yet", "start the service (systemctl start gwagent) or run `gwagent provision`; it registers with DPS")
	c.add("certificate", checkSkipped, "no operational certificate yet", "")
}

// checkNetwork checks DNS, TCP and TLS to hostport (port 8883 if absent),
// verifying the server against the trust bundle as the agent does.
func (c *checker) checkNetwork(ctx context.Context, name, hostport string) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		host, port = hostport, "8883"
	}
	var addrs []string
	if ip := net.ParseIP(host); ip != nil {
		addrs = []string{host}
		c.add(name+"-dns", checkOK, host+" is an address", "")
	} else {
		dctx, cancel := context.WithTimeout(ctx, c.timeout)
		addrs, err = net.DefaultResolver.LookupHost(dctx, host)
		cancel()
		if err != nil {
			c.add(name+"-dns", checkError, fmt.Sprintf("cannot resolve %s: %v", host, err), "check /etc/resolv.conf (resolvectl status) and the gateway's uplink; a firewall may block DNS")
			c.add(name+"-tcp", checkSkipped, "no address", "")
			c.add(name+"-tls", checkSkipped, "no connection", "")
			return
		}
		c.add(name+"-dns", checkOK, host+" is "+strings.Join(addrs, ", "), "")
	}
	d := net.Dialer{Timeout: c.timeout}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(addrs[0], port))
	if err != nil {
		c.add(name+"-tcp", checkError, fmt.Sprintf("cannot connect to %s port %s: %v", host, port, err), "outbound TCP "+port+" (MQTT over TLS) must be open in the firewall; Azure needs 8883 (or 443 with websockets)")
		c.add(name+"-tls", checkSkipped, "no connection", "")
		return
	}
	defer conn.Close()
	c.add(name+"-tcp", checkOK, "connected to "+conn.RemoteAddr().String(), "")
	pool, err := tlsconf.LoadPool(c.cfg.TrustBundle)
	var tc *tls.Config
	if err == nil {
		tc, err = tlsconf.Client(host, pool, nil, nil)
	}
	if err != nil {
		c.add(name+"-tls", checkError, err.Error(), "fix the trust bundle (see the trust-bundle check)")
		return
	}
	tconn := tls.Client(conn, tc)
	hctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	err = tconn.HandshakeContext(hctx)
	if err != nil {
		hint := "a middlebox may intercept TLS; check the firewall and proxy"
		var ua x509.UnknownAuthorityError
		var he x509.HostnameError
		var ci x509.CertificateInvalidError
		switch {
		case errors.As(err, &ua):
			hint = "the server's certificate does not chain to a CA in trust_bundle: add the right root (Azure: see the trust-bundle check), or a TLS-inspecting proxy is in the way"
		case errors.As(err, &he):
			hint = "the server's certificate is for another name: check dps_endpoint / the hub name, and DNS"
		case errors.As(err, &ci):
			hint = "the server's certificate is expired or not yet valid: check the clock"
		}
		c.add(name+"-tls", checkError, fmt.Sprintf("TLS to %s: %v", host, err), hint)
		return
	}
	if port != "443" {
		// Leave politely: an MQTT DISCONNECT before CONNECT makes the broker
		// close the connection, so no half-opened session is left behind
		// when the check returns.
		_ = tconn.SetDeadline(time.Now().Add(min(c.timeout, 5*time.Second)))
		if _, err := tconn.Write([]byte{0xe0, 0x00}); err == nil {
			_, _ = io.Copy(io.Discard, tconn)
		}
	}
	cs := tconn.ConnectionState()
	leaf := cs.PeerCertificates[0]
	c.add(name+"-tls", checkOK, fmt.Sprintf("%s, server certificate for %s verified, issued by %q", tls.VersionName(cs.Version), host, leaf.Issuer.CommonName), "")
}

func (c *checker) checkService(ctx context.Context) {
	st, serr := agent.ReadStatus(c.cfg.StateDir)
	if c.systemctl != nil {
		active, _ := c.systemctl(ctx, "is-active", "gwagent.service")
		enabled, _ := c.systemctl(ctx, "is-enabled", "gwagent.service")
		switch {
		case active == "failed":
			c.add("service", checkError, "gwagent.service failed", "journalctl -u gwagent -n 50 says why; fix it, then systemctl restart gwagent")
			return
		case active != "active" && active != "activating" && active != "reloading":
			hint := "systemctl enable --now gwagent"
			if enabled == "enabled" {
				hint = "systemctl start gwagent"
			}
			c.add("service", checkWarning, fmt.Sprintf("gwagent.service is %s (%s)", orUnknown(active), orUnknown(enabled)), hint)
			return
		case enabled != "enabled":
			c.add("service", checkWarning, "gwagent.service runs but is "+orUnknown(enabled)+": it will not start at boot", "systemctl enable gwagent")
			return
		}
	}
	switch {
	case errors.Is(serr, fs.ErrNotExist):
		c.add("service", checkWarning, "the agent has never run with this state directory", "systemctl enable --now gwagent")
		return
	case serr != nil:
		c.add("service", checkWarning, "cannot read the agent's status: "+serr.Error(), "run gwagent check as root or as the service user")
		return
	}
	if st.State != "stopped" && !processAlive(st.PID) {
		c.add("service", checkWarning, fmt.Sprintf("last state %s at %s, but the agent is not running", st.State, st.UpdatedAt.UTC().Format(time.RFC3339)), "systemctl start gwagent; journalctl -u gwagent says why it stopped")
		return
	}
	if len(st.Conditions) > 0 {
		var conds []string
		for k, v := range st.Conditions {
			conds = append(conds, string(k)+": "+v)
		}
		sort.Strings(conds)
		c.add("service", checkWarning, "state "+st.State+"; "+strings.Join(conds, "; "), "gwagent status and journalctl -u gwagent show details")
		return
	}
	c.add("service", checkOK, "state "+st.State, "")
}
