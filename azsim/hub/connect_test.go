package hub_test

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/azsim/faults"
	"github.com/gwagent/gwagent/azsim/hub"
	"github.com/gwagent/gwagent/azsim/identity"
)

const (
	connAccepted          = 0
	connBadProtocol       = 1
	connServerUnavailable = 3
	connNotAuthorized     = 5
)

func TestConnect(t *testing.T) {
	e := newEnv(t)

	// A registered CA with an intermediate, as in Azure's CA walk-through.
	regRoot := newCA(t, "Contoso Root", nil)
	regInter := newCA(t, "Contoso Intermediate", regRoot)
	var code struct{ VerificationCode string }
	if st := e.api("POST", "/hub/cas/contoso", pemCert(regRoot.cert), &code); st != http.StatusCreated {
		t.Fatalf("upload CA: %d", st)
	}
	proof := regRoot.sign(t, newKey(t).Public(), code.VerificationCode, leafOpts{})
	if st := e.api("POST", "/hub/cas/contoso/verify", pemCert(proof), nil); st != http.StatusOK {
		t.Fatalf("verify CA: %d", st)
	}
	// And one uploaded but never verified.
	unverified := newCA(t, "Fabrikam Root", nil)
	if st := e.api("POST", "/hub/cas/fabrikam", pemCert(unverified.cert), nil); st != http.StatusCreated {
		t.Fatalf("upload CA: %d", st)
	}
	foreign := newCA(t, "Foreign Root", nil)

	caDevice := func(id, cn string, signer *testCA, chainTail []*testCA, o leafOpts) *device {
		key := newKey(t)
		leaf := signer.sign(t, key.Public(), cn, o)
		d := &device{id: id, key: key, chain: []*x509.Certificate{leaf}}
		for _, c := range chainTail {
			d.chain = append(d.chain, c.cert)
		}
		e.putDevice(id, map[string]any{"auth": "certificateAuthority"})
		return d
	}

	// Self-signed device certificates, registered by thumbprint.
	selfCA := newCA(t, "thumb-1", nil) // a self-signed cert with CN thumb-1
	selfSHA256 := sha256.Sum256(selfCA.cert.Raw)
	selfSHA1 := sha1.Sum(selfCA.cert.Raw)
	e.putDevice("thumb-1", map[string]any{"auth": "selfSigned", "thumbprints": []string{strings.ToUpper(hex.EncodeToString(selfSHA256[:]))}})
	e.putDevice("thumb-sha1", map[string]any{"auth": "selfSigned", "thumbprints": []string{hex.EncodeToString(selfSHA1[:])}})
	e.putDevice("thumb-other", map[string]any{"auth": "selfSigned", "thumbprints": []string{strings.Repeat("ab", 32)}})

	symKey := newSymKey()
	e.putDevice("sas-1", map[string]any{"auth": "sas", "primaryKey": symKey})
	host := e.hub.HostName()

	disabled := e.issuedDevice("disabled-1")
	if st := e.api("POST", "/hub/devices/disabled-1/disable", nil, nil); st != http.StatusNoContent {
		t.Fatalf("disable: %d", st)
	}

	past := leafOpts{notBefore: time.Now().Add(-2 * time.Hour), notAfter: time.Now().Add(-time.Hour)}

	tests := []struct {
		name string
		dev  *device
		o    dialOpts
		want byte
		why  string // in the admin API's lastRefusal.reason
	}{
		{"ok/issued-full-chain", e.issuedDevice("issued-1"), dialOpts{}, connAccepted, ""},
		{"ok/registered-verified-ca", caDevice("reg-1", "reg-1", regInter, []*testCA{regInter}, leafOpts{}), dialOpts{}, connAccepted, ""},
		{"ok/thumbprint-sha256", &device{id: "thumb-1"}, dialOpts{cert: certOf(selfCA)}, connAccepted, ""},
		{"ok/thumbprint-sha1", &device{id: "thumb-sha1"}, dialOpts{cert: certOf(selfCA)}, connAccepted, ""},
		{"ok/sas", &device{id: "sas-1", sas: sasToken(host, "sas-1", symKey, time.Now().Add(time.Hour))}, dialOpts{noCert: true}, connAccepted, ""},
		{"ok/username-extra-params", e.issuedDevice("issued-2"), dialOpts{username: host + "/issued-2/?api-version=2021-04-12&DeviceClientType=x%2F1&model-id=dtmi%3Acom%3Ax%3B1"}, connAccepted, ""},

		{"fail/unknown-device", &device{id: "ghost", key: newKey(t)}, dialOpts{noCert: true}, connNotAuthorized, ""},
		{"fail/wrong-cn", caDevice("cn-1", "someone-else", e.issuer.issuing, []*testCA{e.issuer.issuing}, leafOpts{}), dialOpts{}, connNotAuthorized, "CN \"someone-else\" is not the device id"},
		{"fail/foreign-ca", caDevice("foreign-1", "foreign-1", foreign, []*testCA{foreign}, leafOpts{}), dialOpts{}, connNotAuthorized, "unknown authority"},
		{"fail/expired-cert", caDevice("expired-1", "expired-1", e.issuer.issuing, []*testCA{e.issuer.issuing}, past), dialOpts{}, connNotAuthorized, "expired"},
		{"fail/not-yet-valid", caDevice("future-1", "future-1", e.issuer.issuing, nil, leafOpts{notBefore: time.Now().Add(time.Hour), notAfter: time.Now().Add(2 * time.Hour)}), dialOpts{}, connNotAuthorized, "is before"},
		{"fail/unverified-ca", caDevice("unv-1", "unv-1", unverified, []*testCA{unverified}, leafOpts{}), dialOpts{}, connNotAuthorized, "unknown authority"},
		{"fail/registered-ca-missing-intermediate", caDevice("reg-2", "reg-2", regInter, nil, leafOpts{}), dialOpts{}, connNotAuthorized, "unknown authority"},
		{"fail/no-client-cert", e.issuedDevice("nocert-1"), dialOpts{noCert: true}, connNotAuthorized, "no client certificate"},
		{"fail/thumbprint-mismatch", &device{id: "thumb-other"}, dialOpts{cert: certOf(selfCA)}, connNotAuthorized, "thumbprint matches none"},
		{"fail/sas-bad-signature", &device{id: "sas-1", sas: sasToken(host, "sas-1", newSymKey(), time.Now().Add(time.Hour))}, dialOpts{noCert: true}, connNotAuthorized, "signature does not match"},
		{"fail/sas-expired", &device{id: "sas-1", sas: sasToken(host, "sas-1", symKey, time.Now().Add(-time.Minute))}, dialOpts{noCert: true}, connNotAuthorized, "SAS token expired"},
		{"fail/sas-other-device", &device{id: "sas-1", sas: sasToken(host, "sas-2", symKey, time.Now().Add(time.Hour))}, dialOpts{noCert: true}, connNotAuthorized, "is not {hostName}/devices/sas-1"},
		{"fail/sas-other-hub", &device{id: "sas-1", sas: sasToken("elsewhere.azure-devices.net", "sas-1", symKey, time.Now().Add(time.Hour))}, dialOpts{noCert: true}, connNotAuthorized, "names another hub"},
		{"fail/sas-missing", &device{id: "sas-1"}, dialOpts{noCert: true}, connNotAuthorized, "not a SharedAccessSignature"},
		{"fail/username-other-device", e.issuedDevice("issued-3"), dialOpts{username: host + "/issued-1/?api-version=" + apiVersion}, connNotAuthorized, "username names device \"issued-1\""},
		{"fail/username-no-api-version", e.issuedDevice("issued-4"), dialOpts{username: host + "/issued-4/?DeviceClientType=x"}, connNotAuthorized, "has no api-version"},
		{"fail/disabled", disabled, dialOpts{}, connServerUnavailable, "disabled"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, code, err := e.dial(tc.dev, tc.o)
			if code != tc.want {
				t.Fatalf("CONNACK %d (%v), want %d", code, err, tc.want)
			}
			if tc.want == connAccepted {
				c.stillUp(t)
				c.Disconnect(0)
				return
			}
			if err == nil {
				t.Fatal("connect succeeded")
			}
			if tc.why == "" {
				return
			}
			var v struct {
				LastRefusal struct {
					ConnackCode byte
					Reason      string
				}
			}
			e.api("GET", "/hub/devices/"+tc.dev.id, nil, &v)
			if v.LastRefusal.ConnackCode != tc.want || !strings.Contains(v.LastRefusal.Reason, tc.why) {
				t.Fatalf("lastRefusal %+v, want code %d and reason containing %q", v.LastRefusal, tc.want, tc.why)
			}
		})
	}
}

func certOf(ca *testCA) *tls.Certificate {
	return &tls.Certificate{Certificate: [][]byte{ca.cert.Raw}, PrivateKey: ca.key, Leaf: ca.cert}
}

func TestConnectFaults(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")

	t.Run("fail/refusing", func(t *testing.T) {
		e.faults.RefuseUntil(faults.Hub, time.Now().Add(time.Hour))
		_, code, err := e.dial(d, dialOpts{})
		e.faults.Reset()
		if code != connServerUnavailable || err == nil {
			t.Fatalf("CONNACK %d (%v), want 3", code, err)
		}
	})
	t.Run("ok/after-refusal", func(t *testing.T) {
		e.mustDial(d, dialOpts{}).stillUp(t)
	})
	t.Run("ok/drop-all", func(t *testing.T) {
		c := e.mustDial(d, dialOpts{})
		e.hub.DropAll()
		c.waitLost(t)
		e.mustDial(d, dialOpts{}).stillUp(t)
	})
	t.Run("ok/disable-drops-connection", func(t *testing.T) {
		c := e.mustDial(d, dialOpts{})
		if st := e.api("POST", "/hub/devices/dev-1/disable", nil, nil); st != http.StatusNoContent {
			t.Fatalf("disable: %d", st)
		}
		c.waitLost(t)
		if _, code, _ := e.dial(d, dialOpts{}); code != connServerUnavailable {
			t.Fatalf("CONNACK %d for a disabled device, want 3", code)
		}
		if st := e.api("POST", "/hub/devices/dev-1/enable", nil, nil); st != http.StatusNoContent {
			t.Fatalf("enable: %d", st)
		}
		e.mustDial(d, dialOpts{}).stillUp(t)
	})
}

func TestOneConnectionPerDevice(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	first := e.mustDial(d, dialOpts{})
	second := e.mustDial(d, dialOpts{})
	first.waitLost(t)
	second.stillUp(t)
	second.sub(t, "$iothub/twin/res/#")
	second.pub(t, "$iothub/twin/GET/?$rid=1", 0, nil)
	second.recv(t, "$iothub/twin/res/200/")
}

func TestSASExpiryDisconnects(t *testing.T) {
	e := newEnv(t)
	key := newSymKey()
	e.putDevice("sas-1", map[string]any{"auth": "sas", "primaryKey": key})
	// se has one-second resolution: pick an expiry 2-3 s ahead.
	exp := time.Now().Add(3 * time.Second).Truncate(time.Second)
	c := e.mustDial(&device{id: "sas-1", sas: sasToken(e.hub.HostName(), "sas-1", key, exp)}, dialOpts{noCert: true})
	select {
	case <-c.lost:
		if time.Now().Before(exp) {
			t.Fatal("dropped before the token expired")
		}
	case <-time.After(6 * time.Second):
		t.Fatal("connection survived its SAS token")
	}
}

// TestConnectRejectInHandshake: with RejectInHandshake (azsim's default),
// certificates the hub can judge without the CONNECT are refused with a TLS
// alert, as Azure may do, and a certificate the fault injector names is
// refused in the handshake in any mode.
func TestConnectRejectInHandshake(t *testing.T) {
	e := newEnv(t, func(c *hub.Config) { c.RejectInHandshake = true })
	foreign := newCA(t, "Foreign Root", nil)
	key := newKey(t)
	e.putDevice("foreign-1", map[string]any{"auth": "certificateAuthority"})
	foreignDev := &device{id: "foreign-1", key: key, chain: []*x509.Certificate{foreign.sign(t, key.Public(), "foreign-1", leafOpts{}), foreign.cert}}
	selfCA := newCA(t, "thumb-1", nil)
	s256 := sha256.Sum256(selfCA.cert.Raw)
	e.putDevice("thumb-1", map[string]any{"auth": "selfSigned", "thumbprints": []string{hex.EncodeToString(s256[:])}})
	symKey := newSymKey()
	e.putDevice("sas-1", map[string]any{"auth": "sas", "primaryKey": symKey})
	good := e.issuedDevice("good-1")
	revoked := e.issuedDevice("revoked-1")
	e.faults.RejectCertificate(revoked.chain[0].SerialNumber.Text(16))

	for _, tc := range []struct {
		name  string
		dev   *device
		o     dialOpts
		alert bool
	}{
		{"ok/issued", good, dialOpts{}, false},
		{"ok/thumbprint", &device{id: "thumb-1"}, dialOpts{cert: certOf(selfCA)}, false},
		{"ok/sas-without-certificate", &device{id: "sas-1", sas: sasToken(e.hub.HostName(), "sas-1", symKey, time.Now().Add(time.Hour))}, dialOpts{noCert: true}, false},
		{"fail/foreign-ca", foreignDev, dialOpts{}, true},
		{"fail/rejected-by-fault", revoked, dialOpts{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, code, err := e.dial(tc.dev, tc.o)
			if !tc.alert {
				if err != nil {
					t.Fatalf("CONNACK %d: %v", code, err)
				}
				c.stillUp(t)
				return
			}
			if err == nil || code == connNotAuthorized || !strings.Contains(err.Error(), "remote error: tls: bad certificate") {
				t.Fatalf("code %d, err %v; want a bad_certificate alert in the handshake, no CONNACK", code, err)
			}
		})
	}
}

// TestConnectCAList: the hub's CertificateRequest may name CAs that are not
// the device's; a client with a static certificate list then sends nothing
// and is refused, a client that always presents its chain gets in.
func TestConnectCAList(t *testing.T) {
	other := newCA(t, "Some Server Root", nil)
	e := newEnv(t, func(c *hub.Config) {
		c.TLS = c.TLS.Clone()
		c.TLS.ClientCAs = x509.NewCertPool()
		c.TLS.ClientCAs.AddCert(other.cert)
	})
	d := e.issuedDevice("dev-1")
	e.mustDial(d, dialOpts{}).stillUp(t)

	tc := &tls.Config{RootCAs: e.roots, ServerName: "localhost", MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*d.tlsCert()}}
	var got [][]byte
	conn, err := tls.Dial("tcp", e.addr, &tls.Config{RootCAs: e.roots, ServerName: "localhost", MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			got = cri.AcceptableCAs
			return d.tlsCert(), nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if len(got) != 1 || string(got[0]) != string(other.cert.RawSubject) {
		t.Fatalf("certificate_authorities %d names, want the configured one", len(got))
	}
	opts := paho.NewClientOptions().AddBroker("ssl://" + e.addr).SetClientID("dev-1").
		SetUsername(e.hub.HostName() + "/dev-1/?api-version=" + apiVersion).SetTLSConfig(tc).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	cl := paho.NewClient(opts)
	tok := cl.Connect()
	tok.WaitTimeout(10 * time.Second)
	if tok.Error() == nil || tok.(*paho.ConnectToken).ReturnCode() != connNotAuthorized {
		t.Fatalf("static certificate list: %v, want CONNACK 5 (no certificate was sent)", tok.Error())
	}
}

// TestNoCertificateManagement: a hub without the certificate-signing API
// refuses the credentials subscription with SUBACK 0x80 (paho records it in
// the token's result, with no error) and closes the connection on a
// credentials request; everything else works.
func TestNoCertificateManagement(t *testing.T) {
	e := newEnv(t, func(c *hub.Config) { c.NoCertificateManagement = true })
	c := e.mustDial(e.issuedDevice("dev-1"), dialOpts{})
	tok := c.SubscribeMultiple(map[string]byte{"$iothub/twin/res/#": 0, "$iothub/credentials/res/#": 0}, nil)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	res := tok.(*paho.SubscribeToken).Result()
	if res["$iothub/credentials/res/#"] != 0x80 || res["$iothub/twin/res/#"] != 0 {
		t.Fatalf("SUBACK codes %v, want 0x80 for credentials and 0 for the twin", res)
	}
	c.pub(t, "$iothub/twin/GET/?$rid=1", 0, nil)
	c.recv(t, "$iothub/twin/res/200/")
	c.Publish("$iothub/credentials/POST/issueCertificate/?$rid=abcd", 1, false, []byte(`{"id":"dev-1","csr":"x"}`))
	c.waitLost(t)
}

// TestCredentialsFaults: a hub that stays silent on a certificate request
// (PUBACK, then nothing) or drops the connection on it.
func TestCredentialsFaults(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	csr := base64.StdEncoding.EncodeToString(makeCSR(t, newKey(t), "dev-1").Raw)
	body := []byte(`{"id":"dev-1","csr":"` + csr + `"}`)

	e.faults.SetCredentialsMode(faults.CredentialsSilent)
	c := e.mustDial(d, dialOpts{})
	c.sub(t, "$iothub/credentials/res/#")
	c.pub(t, "$iothub/credentials/POST/issueCertificate/?$rid=abcd", 1, body)
	c.none(t, "$iothub/credentials/res/", 2*time.Second)
	c.stillUp(t)

	e.faults.SetCredentialsMode(faults.CredentialsDrop)
	c.Publish("$iothub/credentials/POST/issueCertificate/?$rid=abce", 1, false, body)
	c.waitLost(t)

	e.faults.SetCredentialsMode(faults.CredentialsNormal)
	c = e.mustDial(d, dialOpts{})
	c.sub(t, "$iothub/credentials/res/#")
	c.pub(t, "$iothub/credentials/POST/issueCertificate/?$rid=abcf", 1, body)
	c.recv(t, "$iothub/credentials/res/202/")
}

// TestCredentialsAnswerLost: the certificate answer is lost in a
// connection drop (fault "lose-answer"). As far as the hub knows it was
// sent (QoS 0), so it is not sent again after the device reconnects and
// subscribes; nothing is active any more, so the device may ask again for
// the same key without "replace" (202, then 200), while "replace" naming
// the lost request gets 412.
func TestCredentialsAnswerLost(t *testing.T) {
	e := newEnv(t)
	d := e.issuedDevice("dev-1")
	body := []byte(`{"id":"dev-1","csr":"` + base64.StdEncoding.EncodeToString(makeCSR(t, newKey(t), "dev-1").Raw) + `"}`)
	e.faults.SetCredentialsMode(faults.CredentialsLoseAnswer)
	c := e.mustDial(d, dialOpts{})
	c.sub(t, "$iothub/credentials/res/#")
	c.pub(t, "$iothub/credentials/POST/issueCertificate/?$rid=lost-1", 1, body)
	c.recv(t, "$iothub/credentials/res/202/")
	c.waitLost(t)
	if e.faults.CredentialsMode() != faults.CredentialsNormal {
		t.Fatal("the lose-answer fault applies more than once")
	}

	c = e.mustDial(d, dialOpts{})
	c.sub(t, "$iothub/credentials/res/#")
	c.none(t, "$iothub/credentials/res/", 1500*time.Millisecond)
	replace := []byte(`{"id":"dev-1","csr":"` + base64.StdEncoding.EncodeToString(makeCSR(t, newKey(t), "dev-1").Raw) + `","replace":"lost-1"}`)
	c.pub(t, "$iothub/credentials/POST/issueCertificate/?$rid=lost-2", 1, replace)
	c.recv(t, "$iothub/credentials/res/412/")
	c.pub(t, "$iothub/credentials/POST/issueCertificate/?$rid=lost-3", 1, body)
	c.recv(t, "$iothub/credentials/res/202/")
	m := c.recv(t, "$iothub/credentials/res/200/")
	if !strings.Contains(m.Topic(), "$rid=lost-3") {
		t.Fatalf("the certificate came on %s, want the new request's", m.Topic())
	}
}

// TestCredentialSyncLag: right after DPS registers a device, the hub does
// not know its newly issued certificate yet and answers CONNACK 5; once the
// lag is over it accepts it. The lag only concerns issued certificates.
func TestCredentialSyncLag(t *testing.T) {
	e := newEnv(t, func(c *hub.Config) { c.CredentialSyncLag = 2 * time.Second })
	d := e.issuedDevice("lag-1")
	start := time.Now()
	if err := e.hub.RegisterDevice(context.Background(), identity.Device{ID: "lag-1", Auth: identity.AuthCA, Enabled: true}); err != nil {
		t.Fatal(err)
	}
	if _, code, _ := e.dial(d, dialOpts{}); code != connNotAuthorized {
		t.Fatalf("CONNACK %d during the sync lag, want 5", code)
	}
	eventually(t, "accepted after the lag", func() bool {
		c, code, _ := e.dial(d, dialOpts{})
		if code == connAccepted {
			c.Disconnect(0)
			return true
		}
		return false
	})
	if time.Since(start) < 2*time.Second {
		t.Fatal("accepted before the lag was over")
	}
	// Once accepted, a later registration does not lock the known
	// certificate out.
	if err := e.hub.RegisterDevice(context.Background(), identity.Device{ID: "lag-1", Auth: identity.AuthCA, Enabled: true}); err != nil {
		t.Fatal(err)
	}
	e.mustDial(d, dialOpts{}).stillUp(t)
}

// TestSlowIssuance: with an issuance delay of hours the 202's
// operationExpires lies beyond it, and a second request without "replace"
// gets 409 naming the active one and its operationExpires.
func TestSlowIssuance(t *testing.T) {
	e := newEnv(t, func(c *hub.Config) { c.IssueDelay = 3 * time.Hour })
	c := e.mustDial(e.issuedDevice("dev-1"), dialOpts{})
	c.sub(t, "$iothub/credentials/res/#")
	body := []byte(`{"id":"dev-1","csr":"` + base64.StdEncoding.EncodeToString(makeCSR(t, newKey(t), "dev-1").Raw) + `"}`)
	c.pub(t, "$iothub/credentials/POST/issueCertificate/?$rid=req-1", 1, body)
	m := c.recv(t, "$iothub/credentials/res/202/")
	var acc struct{ OperationExpires time.Time }
	if err := json.Unmarshal(m.Payload(), &acc); err != nil {
		t.Fatal(err)
	}
	if acc.OperationExpires.Before(time.Now().Add(3 * time.Hour)) {
		t.Fatalf("operationExpires %s is before the issuance delay ends", acc.OperationExpires)
	}
	c.pub(t, "$iothub/credentials/POST/issueCertificate/?$rid=req-2", 1, body)
	m = c.recv(t, "$iothub/credentials/res/409/")
	var conflict struct {
		Info struct {
			RequestID        string
			OperationExpires time.Time
		}
	}
	json.Unmarshal(m.Payload(), &conflict)
	if conflict.Info.RequestID != "req-1" || !conflict.Info.OperationExpires.Equal(acc.OperationExpires) {
		t.Fatalf("409 info %+v, want req-1 until %s", conflict.Info, acc.OperationExpires)
	}
}

// TestThrottling: beyond the connection rate the hub answers CONNACK 3;
// beyond the twin rate it answers 429 with retry-after.
func TestThrottling(t *testing.T) {
	// A frozen clock: the one-second windows never slide during the test.
	frozen := time.Now()
	e := newEnv(t, func(c *hub.Config) {
		c.ConnectRate, c.TwinRate = 3, 2
		c.Now = func() time.Time { return frozen }
	})
	var devs []*device
	for i := range 4 {
		devs = append(devs, e.issuedDevice(fmt.Sprintf("dev-%d", i)))
	}
	var codes []byte
	var first *client
	for _, d := range devs {
		c, code, _ := e.dial(d, dialOpts{})
		codes = append(codes, code)
		if first == nil && c != nil {
			first = c
		}
	}
	if codes[0] != connAccepted || codes[1] != connAccepted || codes[2] != connAccepted || codes[3] != connServerUnavailable {
		t.Fatalf("CONNACK codes %v, want three accepted and the fourth refused with 3", codes)
	}
	first.sub(t, "$iothub/twin/res/#")
	var got []int
	for i := range 3 {
		first.pub(t, fmt.Sprintf("$iothub/twin/GET/?$rid=%d", i), 0, nil)
		m := first.recv(t, "$iothub/twin/res/")
		got = append(got, status(m.Topic()))
		if status(m.Topic()) == 429 {
			if ra := topicParam(m.Topic(), "retry-after"); ra == "" || ra == "0" {
				t.Fatalf("429 without retry-after: %s", m.Topic())
			}
		}
	}
	if got[0] != 200 || got[1] != 200 || got[2] != 429 {
		t.Fatalf("twin GET statuses %v, want 200, 200, 429", got)
	}
}
