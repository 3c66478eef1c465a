{{/*
Names, labels and the pod pieces every workload of the chart shares. The services all run
the same image and the same pod shape, so each piece is defined once here and the templates
loop over .Values.services.
*/}}

{{/* The four services, in a fixed order. */}}
{{- define "subsidy.serviceNames" -}}
catalog eligibility ledger audit
{{- end }}

{{/*
Which service calls which over gRPC, and which outside roles call it: the chart's one copy of
services/kernel/topology.py (a chart cannot import Python). The settings (SUBSIDY_<PEER>_ADDR)
and every NetworkPolicy rule between components are derived from it, and
tests/deploy/test_chart_topology.py fails if the rendered chart allows a flow the module does
not declare, or misses one it does. identity_authority is a role: the simulator when
identitySimulator.enabled, else identityAuthority.address and its egressCIDRs. A client role
<role> is the peer networkPolicy.<role>Selector. Use with fromYaml.
*/}}
{{- define "subsidy.topology" -}}
catalog:
  calls: []
  clients: [auditor]
eligibility:
  calls: [identity_authority]
  clients: [platform, auditor]
ledger:
  calls: [catalog, eligibility]
  clients: [platform, auditor]
audit:
  calls: []
  clients: [platform, auditor]
{{- end }}

{{/* The services that call peer .name, in the serviceNames order. (dict "root" $ "name" "catalog") */}}
{{- define "subsidy.callersOf" -}}
{{- $topology := include "subsidy.topology" .root | fromYaml -}}
{{- $callers := list -}}
{{- range $caller := include "subsidy.serviceNames" .root | splitList " " -}}
{{- if has $.name (index $topology $caller).calls -}}
{{- $callers = append $callers $caller -}}
{{- end -}}
{{- end -}}
{{- join " " $callers -}}
{{- end }}

{{/* host:port a service reaches peer .name at. (dict "root" $ "name" "catalog") */}}
{{- define "subsidy.peerAddress" -}}
{{- $v := .root.Values -}}
{{- if ne .name "identity_authority" -}}
{{- printf "%s.%s.svc:%d" (include "subsidy.componentName" (dict "root" .root "name" .name)) .root.Release.Namespace (int $v.grpc.port) -}}
{{- else if $v.identitySimulator.enabled -}}
{{- printf "%s.%s.svc:%d" (include "subsidy.componentName" (dict "root" .root "name" "identity-sim")) .root.Release.Namespace (int $v.grpc.port) -}}
{{- else -}}
{{- $v.identityAuthority.address -}}
{{- end -}}
{{- end }}

{{/* "<release>-subsidy", or the release name when it already says subsidy. */}}
{{- define "subsidy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "subsidy" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-subsidy" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/* Name of one component's objects. Call with (dict "root" $ "name" "ledger"). */}}
{{- define "subsidy.componentName" -}}
{{- printf "%s-%s" (include "subsidy.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/*
Selector labels: what Services, PDBs, HPAs and NetworkPolicies select pods by.
(dict "root" $ "name" "ledger" "component" "server")
*/}}
{{- define "subsidy.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of an object: the selector labels plus chart bookkeeping. */}}
{{- define "subsidy.labels" -}}
{{ include "subsidy.selectorLabels" . }}
app.kubernetes.io/part-of: subsidy
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Labels that pick every pod of one service (server pods and its migration Job pods). */}}
{{- define "subsidy.servicePodSelector" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end }}

{{/* Labels that pick every pod of the release. */}}
{{- define "subsidy.releasePodSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: subsidy
{{- end }}

{{/* The image reference: the digest wins over the tag; the tag defaults to appVersion. */}}
{{- define "subsidy.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end }}

{{/*
One service's effective workload settings: serviceDefaults merged with services.<name>
(maps merge, lists replace). Returns YAML; use with fromYaml.
*/}}
{{- define "subsidy.workload" -}}
{{- $own := index .root.Values.services .name -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.serviceDefaults) (omit $own "database")) -}}
{{- end }}

{{/*
Pod-level security context of every pod in the chart. UID/GID 10001 is the non-root user the
image creates (deploy/docker/Dockerfile).
*/}}
{{- define "subsidy.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context of every container in the chart. */}}
{{- define "subsidy.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Exec probes: `python -m services.kernel.probe` asks grpc.health.v1 on the serving port over
mutual TLS with the pod's own certificate (Kubernetes' native gRPC probes cannot present one,
and there is no plaintext port for them). It exits 0 only on SERVING. One run costs about
0.3 s of CPU, hence the unhurried periods. The startup probe gives a cold start (migrations
already ran in the hook Job) up to a minute before liveness counts.
*/}}
{{- define "subsidy.probes" -}}
{{- $exec := dict "command" (list "python" "-m" "services.kernel.probe" "--addr" (printf "127.0.0.1:%d" (int .Values.grpc.port)) "--tls-dir" (include "subsidy.tlsDir" .) "--timeout" "3") -}}
startupProbe:
  exec:
    {{- toYaml $exec | nindent 4 }}
  periodSeconds: 3
  timeoutSeconds: 5
  failureThreshold: 20
readinessProbe:
  exec:
    {{- toYaml $exec | nindent 4 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
livenessProbe:
  exec:
    {{- toYaml $exec | nindent 4 }}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{/*
SPIFFE id of a release component's certificate: spiffe://subsidy.local/service/<name>, the
form services/kernel/identity.py parses (the trust domain is fixed there, not configurable).
(dict "root" $ "name" "ledger")
*/}}
{{- define "subsidy.spiffeId" -}}
{{- printf "spiffe://subsidy.local/service/%s" .name -}}
{{- end }}

{{/* DNS names of a component's Service, short to fully qualified (JSON list; fromJsonArray). */}}
{{- define "subsidy.serviceDnsNames" -}}
{{- $svc := include "subsidy.componentName" . -}}
{{- $ns := .root.Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .root.Values.tls.clusterDomain) | toJson -}}
{{- end }}

{{/* Where a serving pod finds tls.crt, tls.key and ca.crt (SUBSIDY_TLS_DIR). */}}
{{- define "subsidy.tlsDir" -}}
{{- if eq .Values.tls.provider "vaultAgent" -}}
{{- .Values.vault.injector.secretsDir -}}
{{- else -}}
{{- .Values.tls.certManager.mountPath -}}
{{- end -}}
{{- end }}

{{/* Name of the Secret cert-manager writes a component's certificate to. */}}
{{- define "subsidy.tlsSecretName" -}}
{{- printf "%s-tls" (include "subsidy.componentName" .) -}}
{{- end }}

{{/*
The Vault Agent template of a component's certificate, for tls.provider vaultAgent. pkiCert
issues from tls.vaultAgent.issuePath and keeps the result in its destination file
(tls-bundle.pem, 0400), which it reads back to decide when to renew (at about nine tenths of
the lifetime): that file must hold the certificate, the issuing CA and the key. The key, the
certificate (with the issuing CA, so peers can build the chain) and the CA chain to the root
are also written as the three files the services read.
(dict "root" $ "name" "ledger")
*/}}
{{- define "subsidy.vaultTlsTemplate" -}}
{{- $v := .root.Values -}}
{{- $dir := $v.vault.injector.secretsDir -}}
{{- $params := list (printf "common_name=service-%s" .name) (printf "uri_sans=%s" (include "subsidy.spiffeId" .)) (printf "alt_names=%s" (include "subsidy.serviceDnsNames" . | fromJsonArray | join ",")) "ip_sans=127.0.0.1" (printf "ttl=%s" $v.tls.duration) -}}
{{- $quoted := list -}}
{{- range $params }}{{ $quoted = append $quoted (quote .) }}{{ end -}}
{{- printf "{{- with pkiCert %q %s -}}\n" $v.tls.vaultAgent.issuePath (join " " $quoted) -}}
{{- printf "{{ .Cert }}{{ .CA }}{{ .Key }}\n" -}}
{{- printf "{{ .Key | writeToFile %q \"\" \"\" \"0400\" }}\n" (printf "%s/tls.key" $dir) -}}
{{- printf "{{ print .Cert .CA | writeToFile %q \"\" \"\" \"0444\" }}\n" (printf "%s/tls.crt" $dir) -}}
{{- printf "{{- end }}\n" -}}
{{- printf "{{- with secret %q }}{{ .Data.certificate | writeToFile %q \"\" \"\" \"0444\" }}{{ end -}}\n" $v.tls.vaultAgent.caChainPath (printf "%s/ca.crt" $dir) -}}
{{- end }}

{{/*
OpenTelemetry variables that come from the pod itself (downward API). OTEL_SERVICE_NAME is the
pod's app.kubernetes.io/name label, so traces name the same thing the cluster does. The
$(VAR) references expand because the variables they name are defined above them.
*/}}
{{- define "subsidy.otelEnv" -}}
- name: OTEL_SERVICE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['app.kubernetes.io/name']
- name: K8S_NAMESPACE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: OTEL_RESOURCE_ATTRIBUTES
  {{- $attrs := list "service.namespace=subsidy" (printf "service.version=%s" .Chart.AppVersion) "k8s.namespace.name=$(K8S_NAMESPACE_NAME)" "k8s.pod.name=$(K8S_POD_NAME)" "k8s.node.name=$(K8S_NODE_NAME)" }}
  {{- range $key := keys .Values.otel.resourceAttributes | sortAlpha }}
  {{- $attrs = append $attrs (printf "%s=%s" $key (index $.Values.otel.resourceAttributes $key)) }}
  {{- end }}
  value: {{ join "," $attrs | quote }}
{{- end }}

{{/* Path of the file the Vault Agent renders a service's database password into. */}}
{{- define "subsidy.passwordFile" -}}
{{- printf "%s/db-password" .Values.vault.injector.secretsDir -}}
{{- end }}

{{/* Path of the file the Vault Agent renders the migration role's password into (Jobs only). */}}
{{- define "subsidy.migrationPasswordFile" -}}
{{- printf "%s/db-migration-password" .Values.vault.injector.secretsDir -}}
{{- end }}

{{/*
What only a migration Job adds to a service's settings: the role that owns the schema. It
migrates as that role and grants the service's own role (SUBSIDY_DATABASE_URL's user) only
what each table allows: the events table (and the audit log) SELECT and INSERT, never UPDATE,
DELETE or TRUNCATE. Serving pods never see this URL or its password.
*/}}
{{- define "subsidy.migrationSettings" -}}
{{- $own := index .root.Values.services .name -}}
{{- $owner := dict "user" $own.database.migrationUser "name" $own.database.name -}}
SUBSIDY_MIGRATION_DATABASE_URL: {{ include "subsidy.databaseUrl" (dict "root" .root "database" $owner) | quote }}
SUBSIDY_MIGRATION_DATABASE_PASSWORD_FILE: {{ include "subsidy.migrationPasswordFile" .root | quote }}
{{- end }}

{{/* postgresql+psycopg://USER@HOST:PORT/DBNAME?sslmode=...; the password is never in it. */}}
{{- define "subsidy.databaseUrl" -}}
{{- $pg := .root.Values.postgresql -}}
{{- if and (hasPrefix "verify-" $pg.sslmode) (not .root.Values.caBundle.configMapName) -}}
{{- fail (printf "postgresql.sslmode %s verifies the server against a CA: set caBundle.configMapName to the ConfigMap holding it" $pg.sslmode) -}}
{{- end -}}
{{- printf "postgresql+psycopg://%s@%s:%d/%s?sslmode=%s" .database.user $pg.host (int $pg.port) .database.name $pg.sslmode -}}
{{- end }}

{{/*
Settings one service reads (the data of its ConfigMap). No secret is ever in here: the
database password is a file the Vault Agent renders, every other secret stays in Vault.
*/}}
{{- define "subsidy.settings" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $own := index $v.services .name -}}
{{- $w := include "subsidy.workload" . | fromYaml -}}
SUBSIDY_GRPC_LISTEN: {{ printf "0.0.0.0:%d" (int $v.grpc.port) | quote }}
SUBSIDY_WORKERS: {{ $w.workers | int | toString | quote }}
SUBSIDY_GRPC_REFLECTION: {{ ternary "on" "off" $v.grpc.reflection | quote }}
SUBSIDY_RATE_REGISTRATION: {{ $v.grpc.rateLimits.registration | quote }}
SUBSIDY_RATE_CLAIMS: {{ $v.grpc.rateLimits.claims | quote }}
SUBSIDY_RATE_CHECKOUT: {{ $v.grpc.rateLimits.checkout | quote }}
{{- include "subsidy.tlsSettings" $root }}
SUBSIDY_METRICS_LISTEN: {{ printf "0.0.0.0:%d" (int $v.metrics.port) | quote }}
SUBSIDY_LOG_LEVEL: {{ $v.logLevel | quote }}
SUBSIDY_DATABASE_URL: {{ include "subsidy.databaseUrl" (dict "root" $root "database" $own.database) | quote }}
SUBSIDY_DATABASE_PASSWORD_FILE: {{ include "subsidy.passwordFile" $root | quote }}
SUBSIDY_NATS_URL: {{ $v.nats.url | quote }}
SUBSIDY_NATS_NKEY_PATH: {{ printf "%s/%s" (trimSuffix "/" $v.nats.nkeyPath) .name | quote }}
SUBSIDY_VAULT_ADDR: {{ $v.vault.address | quote }}
SUBSIDY_VAULT_AUTH: "kubernetes"
SUBSIDY_VAULT_K8S_ROLE: {{ printf "subsidy-%s" .name | quote }}
SUBSIDY_VAULT_TRANSIT_MOUNT: {{ $v.vault.transitMount | quote }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $v.otel.endpoint | quote }}
OTEL_TRACES_EXPORTER: {{ $v.otel.tracesExporter | quote }}
{{- include "subsidy.caBundleSettings" $root }}
{{- range $peer := (index (include "subsidy.topology" $root | fromYaml) .name).calls }}
{{ printf "SUBSIDY_%s_ADDR" (upper $peer) }}: {{ include "subsidy.peerAddress" (dict "root" $root "name" $peer) | quote }}
{{- end }}
{{- end }}

{{/*
Vault Agent Injector annotations every pod with an agent carries: log in as .role and keep
running (or, for Jobs, "job" true, only render once as an init container so the Job can
complete). The agent runs as the app's UID so the files it renders are the app's.
(dict "root" $ "role" "subsidy-ledger" "job" false)
*/}}
{{- define "subsidy.vaultAgentAnnotations" -}}
{{- $v := .root.Values.vault -}}
{{- $p := $v.injector.annotationPrefix -}}
{{ $p }}/agent-inject: "true"
{{ $p }}/role: {{ .role | quote }}
{{ $p }}/auth-path: {{ $v.authPath | quote }}
{{ $p }}/agent-run-as-same-user: "true"
{{ $p }}/agent-pre-populate-only: {{ ternary "true" "false" (default false .job) | quote }}
{{- with $v.injector.extraAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
With tls.provider vaultAgent, the annotations that make the agent issue and renew a serving
pod's certificate (see subsidy.vaultTlsTemplate). Nothing otherwise.
(dict "root" $ "name" "ledger")
*/}}
{{- define "subsidy.vaultTlsAnnotations" -}}
{{- if eq .root.Values.tls.provider "vaultAgent" -}}
{{- $p := .root.Values.vault.injector.annotationPrefix -}}
{{ $p }}/agent-inject-secret-tls-bundle.pem: {{ .root.Values.tls.vaultAgent.issuePath | quote }}
{{ $p }}/agent-inject-template-tls-bundle.pem: {{ include "subsidy.vaultTlsTemplate" . | quote }}
{{ $p }}/agent-inject-perms-tls-bundle.pem: "0400"
{{- end -}}
{{- end }}

{{/*
Vault Agent Injector annotations for a pod of one service: log in as role subsidy-<name> and
render the database password, alone, into <secretsDir>/db-password, readable only by the app
user; serving pods ("job" false) also get their certificate (subsidy.vaultTlsAnnotations).
Migration Jobs make no gRPC calls and get no certificate, but also the migration role's
password, into <secretsDir>/db-migration-password.
(dict "root" $ "name" "ledger" "job" false)
*/}}
{{- define "subsidy.vaultAnnotations" -}}
{{- $v := .root.Values.vault -}}
{{- $p := $v.injector.annotationPrefix -}}
{{- $own := index .root.Values.services .name -}}
{{ include "subsidy.vaultAgentAnnotations" (dict "root" .root "role" (printf "subsidy-%s" .name) "job" .job) }}
{{ $p }}/agent-inject-secret-db-password: {{ $own.database.passwordVaultPath | quote }}
{{ $p }}/agent-inject-template-db-password: {{ printf "{{- with secret %q -}}{{ %s }}{{- end -}}" $own.database.passwordVaultPath $v.injector.passwordField | quote }}
{{ $p }}/agent-inject-perms-db-password: "0400"
{{- if .job }}
{{ $p }}/agent-inject-secret-db-migration-password: {{ $own.database.migrationPasswordVaultPath | quote }}
{{ $p }}/agent-inject-template-db-migration-password: {{ printf "{{- with secret %q -}}{{ %s }}{{- end -}}" $own.database.migrationPasswordVaultPath $v.injector.passwordField | quote }}
{{ $p }}/agent-inject-perms-db-migration-password: "0400"
{{- else }}
{{ include "subsidy.vaultTlsAnnotations" . }}
{{- end }}
{{- end }}

{{/* Settings that point a process at its certificate (map entries, after a newline). */}}
{{- define "subsidy.tlsSettings" }}
SUBSIDY_TLS_SOURCE: "files"
SUBSIDY_TLS_DIR: {{ include "subsidy.tlsDir" . | quote }}
{{- end }}

{{/* With tls.provider certManager, the read-only mount of the certificate (list entry). */}}
{{- define "subsidy.tlsMount" -}}
{{- if eq .Values.tls.provider "certManager" }}
- name: tls
  mountPath: {{ .Values.tls.certManager.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* With tls.provider certManager, the certificate's Secret as a volume (list entry).
(dict "root" $ "name" "ledger") */}}
{{- define "subsidy.tlsVolume" -}}
{{- if eq .root.Values.tls.provider "certManager" }}
- name: tls
  secret:
    secretName: {{ include "subsidy.tlsSecretName" . }}
    # 0440: readable by the app through the pod's fsGroup, by nobody else.
    defaultMode: 288
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end }}

{{/* Egress every pod of the release needs: cluster DNS and the OTLP collector. */}}
{{- define "subsidy.baseEgress" -}}
- to:
    {{- list .Values.networkPolicy.dnsSelector | toYaml | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
- to:
    {{- list .Values.otel.egressTo | toYaml | nindent 4 }}
  ports:
    - port: {{ .Values.otel.port }}
      protocol: TCP
{{- end }}

{{/* Where the private CA bundle is mounted, when caBundle.configMapName is set. */}}
{{- define "subsidy.caBundlePath" -}}
{{- printf "/etc/subsidy/ca/%s" .Values.caBundle.key -}}
{{- end }}

{{/* Settings that make libpq and the Vault client trust the private CA (map entries). */}}
{{- define "subsidy.caBundleSettings" -}}
{{- if .Values.caBundle.configMapName }}
PGSSLROOTCERT: {{ include "subsidy.caBundlePath" . | quote }}
REQUESTS_CA_BUNDLE: {{ include "subsidy.caBundlePath" . | quote }}
{{- end }}
{{- end }}

{{/* The CA bundle's volumeMount (list entry), when set. */}}
{{- define "subsidy.caBundleMount" -}}
{{- if .Values.caBundle.configMapName }}
- name: ca-bundle
  mountPath: /etc/subsidy/ca
  readOnly: true
{{- end }}
{{- end }}

{{/* The CA bundle's volume (list entry), when set. */}}
{{- define "subsidy.caBundleVolume" -}}
{{- if .Values.caBundle.configMapName }}
- name: ca-bundle
  configMap:
    name: {{ .Values.caBundle.configMapName }}
    items:
      - key: {{ .Values.caBundle.key }}
        path: {{ .Values.caBundle.key }}
{{- end }}
{{- end }}
