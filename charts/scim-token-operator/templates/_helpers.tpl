{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "scim-token-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name if it contains the chart name, else <release>-<chart>. */}}
{{- define "scim-token-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "scim-token-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scim-token-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scim-token-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "scim-token-operator.labels" -}}
helm.sh/chart: {{ include "scim-token-operator.chart" . }}
{{ include "scim-token-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The label by which the ServiceMonitor selects the release's metrics Services. Not
app.kubernetes.io/instance: Argo CD's default (label) resource tracking overwrites that label on every
object with the Application's name, which need not be the release's name.
*/}}
{{- define "scim-token-operator.metricsServiceLabel" -}}
scim.tokenops.dev/release: {{ .Release.Name | quote }}
{{- end }}

{{- define "scim-token-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "scim-token-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The namespaces to watch as a JSON array (use with fromJsonArray); [] means all namespaces. The
binary takes them comma-separated in WATCH_NAMESPACE and runs one namespaced controller per entry.
*/}}
{{- define "scim-token-operator.watchNamespaces" -}}
{{- .Values.watchNamespaces | default list | uniq | toJson }}
{{- end }}

{{/* "true" when leader election is on: requested, or forced by more than one replica. */}}
{{- define "scim-token-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/* Name of the leader-election Lease (in the release namespace). */}}
{{- define "scim-token-operator.leaseName" -}}
{{- include "scim-token-operator.fullname" . }}
{{- end }}

{{/*
Name of the record key Secret, in the release namespace (RECORD_KEY_SECRET): the operator gets it at
startup and creates it when missing (type Opaque, data exactly `key`, no ownerReferences), and never
updates or deletes it. The secret-write policy admits exactly that create and no other write of it.
*/}}
{{- define "scim-token-operator.recordKeySecretName" -}}
{{- printf "%s-record-key" (include "scim-token-operator.fullname" .) }}
{{- end }}

{{- define "scim-token-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Exactly the requests the operator makes (src/controller.rs):
- ScimDirectories: list + watch (the reflector), patch on the status subresource (server-side apply).
  No get/update/patch/delete on the directories themselves.
- Secrets: list + watch (label-filtered cache), get (after a create answered 409), create (a new token),
  patch (server-side apply guarded by resourceVersion). Never update or delete.
- No scimdirectories/finalizers: the Secret's ownerReference leaves blockOwnerDeletion unset, so the
  OwnerReferencesPermissionEnforcement admission plugin (OpenShift; the test control plane) asks for
  nothing more.
- events.k8s.io Events: create, and patch (a directory's repeated Event folds into a series).
*/}}
{{- define "scim-token-operator.rules" -}}
- apiGroups: ["scim.tokenops.dev"]
  resources: ["scimdirectories"]
  verbs: ["list", "watch"]
- apiGroups: ["scim.tokenops.dev"]
  resources: ["scimdirectories/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
The verifier (`scim-token-operator verify`): its own name, so that no selector of the operator's
(Deployment, Service, PodDisruptionBudget, NetworkPolicy, topology spread) ever matches a verifier pod,
and no selector of the verifier's an operator pod. The operator's selector (name + instance) predates
the verifier and is immutable on an installed Deployment, so the verifier differs by
`app.kubernetes.io/name` rather than by an added `component` label. The full name is cut to 54
characters before the suffix, so that it never collides with the operator's (63 at most).
*/}}
{{- define "scim-token-operator.verifierName" -}}
{{- printf "%s-verifier" (include "scim-token-operator.name" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "scim-token-operator.verifierFullname" -}}
{{- printf "%s-verifier" (include "scim-token-operator.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "scim-token-operator.verifierSelectorLabels" -}}
app.kubernetes.io/name: {{ include "scim-token-operator.verifierName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "scim-token-operator.verifierLabels" -}}
helm.sh/chart: {{ include "scim-token-operator.chart" . }}
{{ include "scim-token-operator.verifierSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: verifier
app.kubernetes.io/part-of: {{ include "scim-token-operator.name" . }}
{{- end }}

{{- define "scim-token-operator.verifierServiceAccountName" -}}
{{- if .Values.verifier.serviceAccount.create }}
{{- default (include "scim-token-operator.verifierFullname" .) .Values.verifier.serviceAccount.name }}
{{- else }}
{{- required "verifier.serviceAccount.name is required when verifier.serviceAccount.create is false" .Values.verifier.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Exactly the requests the verifier makes (src/verify/mod.rs): one watcher per scope (a namespace, or all),
i.e. list + watch on ScimDirectories. Nothing else: it never reads a single directory, never touches
Secrets (it holds token hashes from the directories' status only), writes nothing (no status, no Events,
no Lease: every replica serves, without leader election).
*/}}
{{- define "scim-token-operator.verifierRules" -}}
- apiGroups: ["scim.tokenops.dev"]
  resources: ["scimdirectories"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
The ServiceAccount's user name, as the API server sees it in request.userInfo.username.
*/}}
{{- define "scim-token-operator.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "scim-token-operator.serviceAccountName" .) }}
{{- end }}

{{/*
Name of the cluster-scoped ValidatingAdmissionPolicy and its binding. It carries the release namespace:
two releases of the same name in different namespaces must not share (or fight over) one policy.
*/}}
{{- define "scim-token-operator.secretWritePolicyName" -}}
{{- printf "%s-%s-secret-writes" (include "scim-token-operator.fullname" .) .Release.Namespace }}
{{- end }}
