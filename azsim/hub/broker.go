package hub

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/gwagent/gwagent/azsim/broker"
	"github.com/gwagent/gwagent/azsim/faults"
	"github.com/gwagent/gwagent/azsim/identity"
)

const (
	maxD2CPayload    = 256 * 1024
	maxSubscriptions = 5
)

// hook plugs the hub into the broker: authentication at CONNECT, the topic
// rules, and dispatch of every device PUBLISH. Nothing is routed between
// clients; every message a device gets is written to it by the hub.
type hook struct {
	mqtt.HookBase
	h *Hub
}

func (k *hook) ID() string { return "azsim-iothub" }

func (k *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnConnect,
		mqtt.OnConnectAuthenticate,
		mqtt.OnACLCheck,
		mqtt.OnSessionEstablished,
		mqtt.OnDisconnect,
		mqtt.OnPacketRead,
		mqtt.OnSubscribe,
		mqtt.OnSubscribed,
		mqtt.OnUnsubscribed,
		mqtt.StoredClients,
		mqtt.StoredSubscriptions,
		mqtt.OnPublish,
		mqtt.OnPublished,
		mqtt.OnWillSent,
	}, []byte{b})
}

// refuse answers CONNECT with an MQTT 3.1.1 return code and ends the
// connection. Codes < 0x80 are written as they are for 3.1.1 clients.
func (k *hook) refuse(cl *mqtt.Client, code packets.Code, why error) error {
	if cl.Properties.ProtocolVersion == 5 {
		code = packets.ErrUnsupportedProtocolVersion
	}
	h := k.h
	h.mu.Lock()
	if d, ok := h.devices[cl.ID]; ok {
		// Shown in the admin API: the device only sees a return code.
		d.lastRefusal = &refusal{At: h.now().UTC(), Code: code.Code, Reason: why.Error()}
	}
	h.mu.Unlock()
	_ = h.srv.SendConnack(cl, code, false, nil)
	return fmt.Errorf("hub connect %q refused: %w", cl.ID, why)
}

// OnConnect authenticates the device. A non-nil error has already been
// answered with a CONNACK return code.
func (k *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	h := k.h
	now := h.now()
	if pk.ProtocolVersion != 4 {
		return k.refuse(cl, packets.Err3UnsupportedProtocolVersion, errors.New("IoT Hub speaks MQTT 3.1.1 only"))
	}
	if h.cfg.Faults != nil && h.cfg.Faults.Refusing(faults.Hub, now) {
		return k.refuse(cl, packets.Err3ServerUnavailable, errors.New("refusing connections (fault injected)"))
	}
	if ok, _ := h.connects.Allow("", now); !ok {
		return k.refuse(cl, packets.Err3ServerUnavailable, fmt.Errorf("connection rate above %d per second (throttled)", h.cfg.ConnectRate))
	}
	id := pk.Connect.ClientIdentifier
	if id == "" {
		return k.refuse(cl, packets.Err3ClientIdentifierNotValid, errors.New("empty client id; it must be the device id"))
	}
	user, err := parseUsername(string(pk.Connect.Username))
	if err != nil {
		return k.refuse(cl, packets.Err3NotAuthorized, err)
	}
	if user.deviceID != id {
		return k.refuse(cl, packets.Err3NotAuthorized, fmt.Errorf("username names device %q but client id is %q", user.deviceID, id))
	}

	var chain = peerChain(cl)
	h.mu.Lock()
	d, ok := h.devices[id]
	if !ok {
		h.mu.Unlock()
		return k.refuse(cl, packets.Err3NotAuthorized, errors.New("device not registered"))
	}
	var sasExpiry time.Time
	switch d.Auth {
	case identity.AuthSAS:
		sasExpiry, err = checkSAS(string(pk.Connect.Password), d, []string{h.hostName, h.cfg.HostName, user.host}, now)
	default:
		err = h.checkCertificate(d, chain, h.trustedRootsLocked(), now)
		if err == nil && now.Before(d.syncUntil) && h.issuedByIssuer(chain[0]) &&
			(d.Certificate == nil || string(d.Certificate.DER) != string(chain[0].Raw)) {
			err = fmt.Errorf("certificate not synchronised to the hub yet (credential sync lag until %s)", d.syncUntil.UTC().Format(time.RFC3339))
		}
	}
	if err != nil {
		h.mu.Unlock()
		return k.refuse(cl, packets.Err3NotAuthorized, err)
	}
	if !d.Enabled {
		h.mu.Unlock()
		return k.refuse(cl, packets.Err3ServerUnavailable, errors.New("device is disabled"))
	}
	c := &conn{deviceID: id, apiVersion: user.apiVersion, clean: pk.Connect.Clean, connectedAt: now}
	if pk.Connect.WillFlag {
		c.will = &will{topic: pk.Connect.WillTopic, payload: append([]byte(nil), pk.Connect.WillPayload...), retain: pk.Connect.WillRetain}
	}
	if !sasExpiry.IsZero() {
		// The hub ends SAS connections when the token expires.
		c.sasTimer = time.AfterFunc(sasExpiry.Sub(now), func() { cl.Stop(errors.New("SAS token expired")) })
	}
	h.conns[cl] = c
	changed := false
	if d.Auth != identity.AuthSAS {
		changed = d.setCertificateLocked(chain[0].Raw, "connect", now)
	}
	// A clean session drops what the hub kept for the device; either way
	// the session file changes if the device had or now gets one.
	sessionChanged := d.persistentSession || !pk.Connect.Clean
	if pk.Connect.Clean {
		d.c2d, d.c2dInflight, d.subs = nil, nil, nil
	}
	d.persistentSession = !pk.Connect.Clean
	h.mu.Unlock()
	if changed {
		_ = h.persist() // the certificate record is informational
	}
	if sessionChanged {
		_ = h.saveSessions()
	}
	return nil
}

// issuedByIssuer reports whether leaf was signed by one of the issuer's CAs.
func (h *Hub) issuedByIssuer(leaf *x509.Certificate) bool {
	for _, ca := range h.cfg.Issuer.IssuingCAs() {
		if leaf.CheckSignatureFrom(ca) == nil {
			return true
		}
	}
	return false
}

func peerChain(cl *mqtt.Client) []*x509.Certificate {
	return broker.PeerCertificates(cl.Net.Conn)
}

// OnConnectAuthenticate: OnConnect has already decided.
func (k *hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	k.h.mu.Lock()
	defer k.h.mu.Unlock()
	_, ok := k.h.conns[cl]
	return ok
}

func (k *hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	// A resumed session keeps its subscriptions: deliver what waited.
	k.h.flush(cl)
}

func (k *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	if cl.Net.Conn == nil {
		// A session restored from sessions.json (StoredClients) while the
		// broker starts, under Start's lock: it never had a connection.
		return
	}
	h := k.h
	h.mu.Lock()
	c, ok := h.conns[cl]
	if ok {
		if c.sasTimer != nil {
			c.sasTimer.Stop()
		}
		delete(h.conns, cl)
	}
	h.mu.Unlock()
	// The broker sends the Will only when its reader fails. A connection
	// the hub stopped while the reader was between packets (DropAll, a
	// disabled device, an expired SAS token) ends its reader quietly and
	// the broker forgets the Will; IoT Hub sends it for every connection
	// that ends without the device's DISCONNECT.
	if ok && c.will != nil && !errors.Is(cl.StopCause(), packets.CodeDisconnect) {
		h.forwardWill(cl.ID, c.will)
	}
}

// subscription filters a device may use, by kind.
type subKind int

const (
	subNone subKind = iota
	subC2D
	subTwinRes
	subDesired
	subMethods
	subCredentials
)

func classifyFilter(deviceID, f string) subKind {
	switch f {
	case "devices/" + deviceID + "/messages/devicebound/#", "devices/+/messages/devicebound/#":
		return subC2D
	case "$iothub/twin/res/#":
		return subTwinRes
	case "$iothub/twin/PATCH/properties/desired/#":
		return subDesired
	case "$iothub/methods/POST/#":
		return subMethods
	case "$iothub/credentials/res/#":
		return subCredentials
	}
	return subNone
}

func subscribed(cl *mqtt.Client, kind subKind) (bool, byte) {
	for f, s := range cl.State.Subscriptions.GetAll() {
		if classifyFilter(cl.ID, f) == kind {
			return true, min(s.Qos, 1)
		}
	}
	return false, 0
}

func (k *hook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	for i := range pk.Filters {
		if pk.Filters[i].Qos > 1 {
			pk.Filters[i].Qos = 1
		}
	}
	return pk
}

// OnACLCheck allows the documented filters, at most five at a time.
// Publishes were vetted in OnPacketRead already.
func (k *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if write {
		return true
	}
	switch classifyFilter(cl.ID, topic) {
	case subNone:
		return false
	case subCredentials:
		if k.h.cfg.NoCertificateManagement {
			return false // SUBACK 0x80
		}
	}
	if _, ok := cl.State.Subscriptions.Get(topic); ok {
		return true
	}
	return cl.State.Subscriptions.Len() < maxSubscriptions
}

// OnSubscribed keeps a persistent session's new subscriptions and
// delivers what they let through.
func (k *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	h := k.h
	h.mu.Lock()
	changed := false
	if d, ok := h.devices[cl.ID]; ok && d.persistentSession {
		for i, f := range pk.Filters {
			if i < len(codes) && codes[i] < 0x80 {
				if d.subs == nil {
					d.subs = map[string]byte{}
				}
				d.subs[f.Filter], changed = codes[i], true
			}
		}
	}
	h.mu.Unlock()
	if changed {
		_ = h.saveSessions()
	}
	h.flush(cl)
}

// errClose makes the broker drop the connection: a hook error other than
// ErrRejectPacket is ignored by mochi's OnPacketRead chain.
func errClose(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), packets.ErrRejectPacket)
}

// OnPacketRead enforces what makes IoT Hub close a connection: QoS 2,
// oversized messages, topics the device may not publish to.
func (k *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Puback {
		k.h.c2dAcked(cl.ID, pk.PacketID)
	}
	if pk.FixedHeader.Type != packets.Publish {
		return pk, nil
	}
	if pk.FixedHeader.Qos > 1 {
		return pk, errClose("QoS 2 PUBLISH")
	}
	if len(pk.Payload) > maxD2CPayload {
		return pk, errClose("message of %d bytes exceeds 256 KiB", len(pk.Payload))
	}
	t, err := parseDeviceTopic(cl.ID, pk.TopicName)
	if err != nil {
		return pk, errClose("%v", err)
	}
	if (t.kind == topicTwinGet || t.kind == topicTwinReported) && k.h.quota.exhausted() {
		// "All requests to IoT Hub fail with 403002" (Learn); on MQTT the
		// request is not answered and the connection closes.
		k.h.noteDisconnect(cl.ID, 403002, "IoTHubQuotaExceeded: twin request while the daily quota is used up")
		return pk, errClose("twin request refused: daily quota used up (403002)")
	}
	if t.kind == topicIssueCert {
		if k.h.cfg.NoCertificateManagement {
			return pk, errClose("this hub has no certificate management")
		}
		if k.h.cfg.Faults != nil && k.h.cfg.Faults.CredentialsMode() == faults.CredentialsDrop {
			return pk, errClose("credentials request dropped (fault injected)")
		}
	}
	return pk, nil
}

// OnPublish takes telemetry (record, charge, shape: see admitTelemetry)
// before the PUBACK and keeps the broker from routing anything.
func (k *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	t, err := parseDeviceTopic(cl.ID, pk.TopicName)
	if err == nil && t.kind == topicTelemetry {
		return pk, k.h.admitTelemetry(cl, pk, t)
	}
	return pk, packets.CodeSuccessIgnore
}

// OnPublished answers requests after the PUBACK went out.
func (k *hook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	t, err := parseDeviceTopic(cl.ID, pk.TopicName)
	if err != nil {
		return
	}
	h := k.h
	switch t.kind {
	case topicTwinGet:
		h.twinGet(cl, t)
	case topicTwinReported:
		h.twinPatchReported(cl, t, pk.Payload)
	case topicMethodRes:
		h.methodResponse(cl, t, pk.Payload)
	case topicIssueCert:
		h.issueCertificate(cl, t, pk.Payload)
	}
}

// OnWillSent forwards a device's Will as telemetry, as the hub does when a
// connection ends without DISCONNECT.
func (k *hook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	// The broker sends the Will before OnDisconnect, so an authenticated
	// connection is still known here; taking its Will makes sure
	// OnDisconnect does not forward it a second time.
	h := k.h
	h.mu.Lock()
	c, authed := h.conns[cl]
	var w *will
	if authed {
		w, c.will = c.will, nil
	}
	h.mu.Unlock()
	if w != nil {
		h.forwardWill(cl.ID, w)
	}
}

// forwardWill records a device's Will as telemetry when its topic is the
// device's telemetry topic, and charges it to the daily quota. A device
// deleted or disabled (which is what ended its connection) may not send
// telemetry any more, its Will included.
func (h *Hub) forwardWill(deviceID string, w *will) {
	t, err := parseDeviceTopic(deviceID, w.topic)
	if err != nil || t.kind != topicTelemetry || h.quota.exhausted() {
		return
	}
	h.mu.Lock()
	d, ok := h.devices[deviceID]
	mayPublish := ok && d.Enabled
	h.mu.Unlock()
	if !mayPublish {
		return
	}
	h.quota.charge(messageSize(t.bag, w.payload))
	h.recordTelemetry(deviceID, w.topic, t.bag, w.payload, w.retain, true)
}

// send writes one PUBLISH to the client.
func (h *Hub) send(cl *mqtt.Client, topic string, payload []byte, qos byte) error {
	_, err := broker.Send(cl, topic, payload, qos)
	return err
}
