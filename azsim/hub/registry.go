package hub

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/gwagent/gwagent/azsim/identity"
)

// deviceState is what hub.json keeps per device.
type deviceState struct {
	ID          string            `json:"deviceId"`
	Auth        identity.AuthKind `json:"auth"`
	Enabled     bool              `json:"enabled"`
	PrimaryKey  string            `json:"primaryKey,omitempty"`
	Thumbprints []string          `json:"thumbprints,omitempty"`
	// CertificateCN: the CN of the device's DPS-issued certificates when it
	// is not the device id (identity.Device.CertificateCN).
	CertificateCN string      `json:"certificateCN,omitempty"`
	Twin          twin        `json:"twin"`
	Certificate   *certRecord `json:"certificate,omitempty"`
	CreatedAt     time.Time   `json:"createdAt"`
}

// certRecord is the device's current certificate: the one it last
// authenticated with or was issued by the renewal API, whichever is newer.
type certRecord struct {
	DER    []byte    `json:"der"`
	Source string    `json:"source"` // "connect" or "renewal"
	At     time.Time `json:"at"`
}

// device is a registry entry plus what only lives while azsim runs.
type device struct {
	deviceState
	// persistentSession: the device's last CONNECT had CleanSession=0, so
	// C2D messages wait for it (up to maxC2DQueue).
	persistentSession bool
	c2d               []c2dMessage    // waiting to be sent
	c2dInflight       []inflightC2D   // sent at QoS 1, not yet acknowledged
	subs              map[string]byte // a persistent session's subscriptions
	renewal           *renewalOp
	lastRefusal       *refusal
	lastDisconnect    *disconnect
	// syncUntil: until then a newly issued certificate is not known to the
	// hub yet (Config.CredentialSyncLag).
	syncUntil time.Time
}

// refusal is why the device's last CONNECT was refused.
type refusal struct {
	At     time.Time `json:"at"`
	Code   byte      `json:"connackCode"`
	Reason string    `json:"reason"`
}

// disconnect is why the hub last closed the device's connection for
// something it did (quota, throttling): Azure shows such codes in the
// hub's logs only, the device just sees the connection end.
type disconnect struct {
	At        time.Time `json:"at"`
	ErrorCode int       `json:"errorCode"`
	Reason    string    `json:"reason"`
}

// conn is one authenticated MQTT connection.
type conn struct {
	deviceID    string
	apiVersion  string
	clean       bool
	connectedAt time.Time
	sasTimer    *time.Timer
	// will is the CONNECT's Will, kept until it is forwarded or the device
	// disconnects cleanly; nil when the CONNECT had none.
	will *will
}

// will is a device's Last Will as its CONNECT gave it.
type will struct {
	topic   string
	payload []byte
	retain  bool
}

// deviceSpec is a create/update request (admin PUT or DPS RegisterDevice).
type deviceSpec struct {
	Auth        identity.AuthKind `json:"auth"`
	PrimaryKey  string            `json:"primaryKey,omitempty"`
	Thumbprints []string          `json:"thumbprints,omitempty"`
	Enabled     *bool             `json:"enabled,omitempty"`
	// CertificateCN is the CN of certificates accepted besides the device id.
	CertificateCN string `json:"certificateCN,omitempty"`
}

// httpError carries an HTTP status for the admin API; the message says what
// is wrong and what to do.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) error {
	return &httpError{status: status, msg: fmt.Sprintf(format, args...)}
}

// validDeviceID follows the registry's rule: up to 128 ASCII letters,
// digits and - . % _ * ? ! ( ) , : = @ $ '.
func validDeviceID(id string) error {
	if id == "" || len(id) > 128 {
		return errorf(http.StatusBadRequest, "device id %q must be 1 to 128 characters", id)
	}
	for _, r := range id {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		case strings.ContainsRune("-.%_*?!(),:=@$'", r):
		default:
			return errorf(http.StatusBadRequest, "device id %q contains %q; use ASCII letters, digits and - . %% _ * ? ! ( ) , : = @ $ '", id, r)
		}
	}
	return nil
}

// normThumbprint returns a lower-case hex SHA-1 or SHA-256 thumbprint
// without separators.
func normThumbprint(t string) (string, error) {
	s := strings.ToLower(strings.NewReplacer(":", "", " ", "", "-", "").Replace(t))
	if _, err := hex.DecodeString(s); err != nil || (len(s) != 40 && len(s) != 64) {
		return "", errorf(http.StatusBadRequest, "thumbprint %q is not a hex SHA-1 (40 digits) or SHA-256 (64 digits) fingerprint; compute one with `openssl x509 -noout -fingerprint -sha256`", t)
	}
	return s, nil
}

func (s *deviceSpec) validate() error {
	switch s.Auth {
	case identity.AuthCA:
		if s.PrimaryKey != "" || len(s.Thumbprints) > 0 {
			return errorf(http.StatusBadRequest, "auth %q takes neither primaryKey nor thumbprints", s.Auth)
		}
	case identity.AuthSAS:
		key, err := base64.StdEncoding.DecodeString(s.PrimaryKey)
		if err != nil || len(key) < 16 || len(key) > 64 {
			return errorf(http.StatusBadRequest, "auth %q needs primaryKey: base64 of 16 to 64 random bytes (e.g. `openssl rand -base64 32`)", s.Auth)
		}
		if len(s.Thumbprints) > 0 {
			return errorf(http.StatusBadRequest, "auth %q takes no thumbprints", s.Auth)
		}
	case identity.AuthSelfSigned:
		if len(s.Thumbprints) == 0 || len(s.Thumbprints) > 2 {
			return errorf(http.StatusBadRequest, "auth %q needs one or two thumbprints (primary, secondary)", s.Auth)
		}
		if s.PrimaryKey != "" {
			return errorf(http.StatusBadRequest, "auth %q takes no primaryKey", s.Auth)
		}
		for i, t := range s.Thumbprints {
			n, err := normThumbprint(t)
			if err != nil {
				return err
			}
			s.Thumbprints[i] = n
		}
	default:
		return errorf(http.StatusBadRequest, "auth %q is not one of %q, %q, %q", s.Auth, identity.AuthCA, identity.AuthSelfSigned, identity.AuthSAS)
	}
	return nil
}

// putDevice creates or updates a device identity, keeping its twin.
func (h *Hub) putDevice(id string, spec deviceSpec) (deviceView, bool, error) {
	if err := validDeviceID(id); err != nil {
		return deviceView{}, false, err
	}
	spec.Thumbprints = append([]string(nil), spec.Thumbprints...)
	if err := spec.validate(); err != nil {
		return deviceView{}, false, err
	}
	h.mu.Lock()
	d, exists := h.devices[id]
	if !exists {
		d = &device{deviceState: deviceState{ID: id, Enabled: true, Twin: newTwin(), CreatedAt: h.now().UTC()}}
		h.devices[id] = d
	}
	d.Auth, d.PrimaryKey, d.Thumbprints, d.CertificateCN = spec.Auth, spec.PrimaryKey, spec.Thumbprints, spec.CertificateCN
	if spec.Enabled != nil {
		d.Enabled = *spec.Enabled
	}
	disabled := !d.Enabled
	h.mu.Unlock()
	if disabled {
		h.dropDevice(id)
	}
	if err := h.persist(); err != nil {
		return deviceView{}, false, err
	}
	v, _ := h.deviceView(id)
	return v, !exists, nil
}

func (h *Hub) deleteDevice(id string) error {
	h.mu.Lock()
	d, ok := h.devices[id]
	delete(h.devices, id)
	h.mu.Unlock()
	if !ok {
		return errNoDevice(id)
	}
	h.dropDevice(id)
	if d.persistentSession {
		_ = h.saveSessions()
	}
	return h.persist()
}

func errNoDevice(id string) error {
	return errorf(http.StatusNotFound, "device %q is not registered; create it with PUT /hub/devices/%s or provision it through DPS", id, id)
}

func (h *Hub) setEnabled(id string, on bool) error {
	h.mu.Lock()
	d, ok := h.devices[id]
	if ok {
		d.Enabled = on
	}
	h.mu.Unlock()
	if !ok {
		return errNoDevice(id)
	}
	if !on {
		h.dropDevice(id)
	}
	return h.persist()
}

// dropDevice closes the device's connections (without DISCONNECT, as the
// hub does).
func (h *Hub) dropDevice(id string) {
	h.mu.Lock()
	var cls []*mqtt.Client
	for cl, c := range h.conns {
		if c.deviceID == id {
			cls = append(cls, cl)
		}
	}
	h.mu.Unlock()
	for _, cl := range cls {
		cl.Stop(errDropped)
	}
}

// liveClientLocked returns the device's current connection, if any.
func (h *Hub) liveClientLocked(id string) (*mqtt.Client, *conn) {
	var best *mqtt.Client
	var bc *conn
	for cl, c := range h.conns {
		if c.deviceID != id || cl.Closed() {
			continue
		}
		if bc == nil || c.connectedAt.After(bc.connectedAt) {
			best, bc = cl, c
		}
	}
	return best, bc
}

// setCertificateLocked records the device's current certificate.
func (d *device) setCertificateLocked(der []byte, source string, at time.Time) bool {
	if d.Certificate != nil && string(d.Certificate.DER) == string(der) {
		return false
	}
	d.Certificate = &certRecord{DER: append([]byte(nil), der...), Source: source, At: at.UTC()}
	return true
}

// deviceView is a device as the admin API shows it. Keys never appear.
type deviceView struct {
	DeviceID    string            `json:"deviceId"`
	Auth        identity.AuthKind `json:"auth"`
	Enabled     bool              `json:"enabled"`
	Connected   bool              `json:"connected"`
	Thumbprints []string          `json:"thumbprints,omitempty"`
	Certificate *certView         `json:"certificate,omitempty"`
	C2DQueued   int               `json:"c2dQueued"`
	Renewal     *renewalView      `json:"renewal,omitempty"`
	// LastRefusal says why the last CONNECT was refused (never secrets).
	LastRefusal *refusal `json:"lastRefusal,omitempty"`
	// LastDisconnect says why the hub last closed the device's connection
	// (403002 quota used up, 429002 throttled).
	LastDisconnect *disconnect `json:"lastDisconnect,omitempty"`
}

type certView struct {
	Serial    string    `json:"serial"`
	Subject   string    `json:"subject"`
	Issuer    string    `json:"issuer"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
	SHA256    string    `json:"sha256"`
	Source    string    `json:"source"`
	Since     time.Time `json:"since"`
}

type renewalView struct {
	RequestID        string    `json:"requestId"`
	CorrelationID    string    `json:"correlationId"`
	OperationExpires time.Time `json:"operationExpires"`
	Issued           bool      `json:"issued"`
}

func newCertView(r *certRecord) *certView {
	if r == nil {
		return nil
	}
	sum := sha256.Sum256(r.DER)
	v := &certView{SHA256: hex.EncodeToString(sum[:]), Source: r.Source, Since: r.At}
	if c, err := x509.ParseCertificate(r.DER); err == nil {
		v.Serial = strings.ToLower(c.SerialNumber.Text(16))
		v.Subject = c.Subject.String()
		v.Issuer = c.Issuer.String()
		v.NotBefore = c.NotBefore.UTC()
		v.NotAfter = c.NotAfter.UTC()
	}
	return v
}

func (h *Hub) deviceViewLocked(d *device) deviceView {
	cl, _ := h.liveClientLocked(d.ID)
	v := deviceView{
		DeviceID:       d.ID,
		Auth:           d.Auth,
		Enabled:        d.Enabled,
		Connected:      cl != nil,
		Thumbprints:    d.Thumbprints,
		Certificate:    newCertView(d.Certificate),
		C2DQueued:      len(d.c2d) + len(d.c2dInflight),
		LastRefusal:    d.lastRefusal,
		LastDisconnect: d.lastDisconnect,
	}
	if op := d.renewal; op != nil {
		v.Renewal = &renewalView{RequestID: op.rid, CorrelationID: op.correlationID, OperationExpires: op.expires, Issued: op.chain != nil}
	}
	return v
}

func (h *Hub) deviceView(id string) (deviceView, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.devices[id]
	if !ok {
		return deviceView{}, errNoDevice(id)
	}
	return h.deviceViewLocked(d), nil
}

func (h *Hub) deviceViews() []deviceView {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]deviceView, 0, len(h.devices))
	for _, d := range h.devices {
		out = append(out, h.deviceViewLocked(d))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].DeviceID < out[j].DeviceID })
	return out
}
